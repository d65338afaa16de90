"""The System Manager client against the fake over real HTTP: authentication, decoding, names, round-robin IPs,
deletes and errors."""

from __future__ import annotations

import random

import httpx
import pytest

from flops.oakestra.client import (
    TOKEN_RELOGIN_AFTER,
    Credentials,
    InvalidName,
    ServiceRejected,
    ServiceSpec,
    SystemManager,
    SystemManagerError,
)
from flops.oakestra.fake import FakeSystemManager
from flops.oakestra.fake_state import FakeState
from flops.ports import free_port
from tests.oakestra.support import FakeControl, VirtualClock, paths


def test_login_then_login_again_when_either_kind_of_endpoint_refuses_an_expired_token(
    sm: SystemManager, control: FakeControl
) -> None:
    app = sm.create_application("projabc")
    control.expire_tokens()
    assert [a.id for a in sm.applications()] == [app.id]  # @jwt_required: 401 {"msg": "Token has expired"}
    service_id = sm.create_service(app, ServiceSpec("learner", "img"))
    control.expire_tokens()
    sm.deploy_instance(service_id)  # @jwt_auth_required: 401 {"message": "Missing authentication token"}

    calls = control.calls()
    refused = [c["response"] for c in calls if c["status"] == 401]
    assert refused == [{"msg": "Token has expired"}, {"message": "Missing authentication token"}]
    assert paths(calls).count("POST /api/auth/login") == 3
    assert calls[-1]["path"] == f"/api/service/{service_id}/instance" and calls[-1]["status"] == 200


def test_a_token_refused_again_right_after_login_is_an_error_not_a_loop(
    sm: SystemManager, control: FakeControl
) -> None:
    control.fault("GET", "/api/applications/", 401, {"msg": "Token has expired"}, times=5)
    with pytest.raises(SystemManagerError) as refused:
        sm.applications()
    assert (refused.value.method, refused.value.path, refused.value.status) == ("GET", "/api/applications/", 401)
    assert refused.value.body == {"msg": "Token has expired"}
    assert paths(control.calls()).count("POST /api/auth/login") == 2


def test_a_token_near_its_ten_minutes_is_renewed_before_oakestra_refuses_it(
    sm: SystemManager, control: FakeControl, clock: VirtualClock
) -> None:
    sm.applications()
    clock.advance(TOKEN_RELOGIN_AFTER + 1)
    sm.applications()
    assert paths(control.calls()) == ["POST /api/auth/login", "GET /api/applications/"] * 2


def test_wrong_password_is_an_error_naming_the_login(fake: FakeSystemManager) -> None:
    with SystemManager(fake.url, Credentials("Admin", "nope")) as sm, pytest.raises(SystemManagerError) as refused:
        sm.applications()
    assert (refused.value.path, refused.value.status) == ("/api/auth/login", 401)
    assert refused.value.body == {"code": 401, "status": "Unauthorized"}


def test_double_encoded_documents_become_typed_objects(sm: SystemManager, fake: FakeSystemManager) -> None:
    app = sm.create_application("projabc")
    service_id = sm.create_service(app, ServiceSpec("learner", "img", ["python3", "-m", "x"], ["A=1"]))
    sm.deploy_instance(service_id)
    sm.service(service_id)  # REQUESTED; this look moves the script on to CLUSTER_SCHEDULED

    raw = httpx.get(
        f"{fake.url}/api/service/{service_id}", headers={"Authorization": f"Bearer {sm._token}"}
    )  # what the wire carries: a JSON string holding the document
    assert isinstance(raw.json(), str)
    service = sm.service(service_id)
    assert service is not None
    assert (service.id, service.name, service.application_id) == (service_id, "learner", app.id)
    assert (service.cmd, service.environment, service.image) == (["python3", "-m", "x"], ["A=1"], "img")
    assert [(i.number, i.status) for i in service.instances] == [(0, "NODE_SCHEDULED")]
    assert [s.id for s in sm.services(app.id)] == [service_id]


def test_an_application_that_exists_is_reused_by_name(fake: FakeSystemManager, control: FakeControl) -> None:
    with SystemManager(fake.url) as first, SystemManager(fake.url) as second:
        created = first.create_application("projabc", description="one project")
        reused = second.create_application("projabc")
    assert reused.id == created.id
    calls = control.calls()
    assert [c["status"] for c in calls if c["path"] == "/api/application/"] == [200, 409]
    assert paths(calls)[-1] == "GET /api/applications/"


def test_names_oakestra_would_refuse_are_refused_before_any_call(sm: SystemManager, control: FakeControl) -> None:
    with pytest.raises(InvalidName):
        sm.create_application("proj-abc")
    with pytest.raises(InvalidName):
        sm.create_application("p" * 31)
    app = sm.create_application("projabc")
    with pytest.raises(InvalidName):
        sm.create_service(app, ServiceSpec("flearner_0", "img"))
    assert "POST /api/service/" not in paths(control.calls())


def test_a_round_robin_ip_held_by_another_service_is_retried_with_a_new_one(
    fake: FakeSystemManager, control: FakeControl
) -> None:
    # Same seed: the second client draws the IP the first one already holds.
    with (
        SystemManager(fake.url, rng=random.Random(7)) as first,
        SystemManager(fake.url, rng=random.Random(7)) as second,
    ):
        app = first.create_application("projabc")
        first.create_service(app, ServiceSpec("builder", "img"))
        service_id = second.create_service(app, ServiceSpec("learner", "img"))
        service = second.service(service_id)
    creates = [c for c in control.calls() if paths([c]) == ["POST /api/service/"]]
    ips = [c["body"]["applications"][0]["microservices"][0]["addresses"]["rr_ip"] for c in creates]
    assert len(ips) == 3 and ips[0] == ips[1] != ips[2]
    assert creates[1]["response"]["failed_services"][0]["service_name"] == "learner"
    assert service is not None and service.rr_ip == ips[2]
    assert ips[2].startswith("10.30.")


def test_a_service_refused_every_time_is_an_error_and_leaves_nothing(sm: SystemManager, control: FakeControl) -> None:
    app = sm.create_application("projabc")
    control.rr_conflicts(100)
    with pytest.raises(ServiceRejected) as rejected:
        sm.create_service(app, ServiceSpec("learner", "img"))
    assert rejected.value.attempts == 5 and len(set(rejected.value.rr_ips)) == 5
    assert sm.services(app.id) == []


def test_paths_without_their_trailing_slash_are_followed(sm: SystemManager) -> None:
    sm.create_application("projabc")
    status, apps = sm.call("GET", "/api/applications")  # 308 to /api/applications/
    assert status == 200 and [a["application_name"] for a in apps] == ["projabc"]


def test_deleting_what_is_already_gone_is_not_an_error(sm: SystemManager) -> None:
    app = sm.create_application("projabc")
    service_id = sm.create_service(app, ServiceSpec("learner", "img"))
    assert sm.delete_service(service_id) is True
    assert sm.delete_service(service_id) is False  # 500
    assert sm.service(service_id) is None  # 404
    assert sm.delete_application(app.id) is True
    assert sm.delete_application(app.id) is False  # 501
    assert sm.find_application("projabc") is None


def test_deleting_an_application_deletes_its_services(sm: SystemManager) -> None:
    app = sm.create_application("projabc")
    ids = [sm.create_service(app, ServiceSpec(name, "img")) for name in ("builder", "learner")]
    sm.delete_application(app.id)
    assert [sm.service(i) for i in ids] == [None, None]


def test_a_refusal_names_method_path_status_and_body(sm: SystemManager, control: FakeControl) -> None:
    app = sm.create_application("projabc")
    control.fault("POST", "/api/service/", 400, {"code": 400, "status": "Bad Request"})
    with pytest.raises(SystemManagerError) as refused:
        sm.create_service(app, ServiceSpec("learner", "img"))
    err = refused.value
    assert (err.method, err.path, err.status, err.body) == (
        "POST",
        "/api/service/",
        400,
        {"code": 400, "status": "Bad Request"},
    )
    assert "POST /api/service/: 400" in str(err)


def test_an_unreachable_system_manager_is_an_error_within_the_timeout() -> None:
    with SystemManager(f"http://127.0.0.1:{free_port()}", timeout=2) as sm, pytest.raises(SystemManagerError) as down:
        sm.active_clusters()
    assert (down.value.path, down.value.status) == ("/api/clusters/active", None)


def test_active_clusters_are_read_from_a_text_html_answer(
    sm: SystemManager, control: FakeControl, fake: FakeSystemManager
) -> None:
    control.clusters(
        [
            {"cluster_name": "edge1", "supported_addons": ["FLOps-learner", "FLOps-learner"]},
            {"cluster_name": "gone", "active": False},
        ]
    )
    assert httpx.get(f"{fake.url}/api/clusters/active").headers["content-type"].startswith("text/html")
    clusters = sm.active_clusters()
    assert [(c.name, c.supported_addons) for c in clusters] == [("edge1", ["FLOps-learner", "FLOps-learner"])]
    assert len(clusters[0].id) == 24


def test_a_user_without_the_admin_role_finds_their_applications_by_user_id() -> None:
    state = FakeState(users={"Admin": "Admin", "alice": "pw"})
    with FakeSystemManager(state=state) as fake, SystemManager(fake.url, Credentials("alice", "pw")) as alice:
        control = FakeControl(fake.url)
        with SystemManager(fake.url) as admin:
            admin.create_application("projabc")  # the same name, someone else's: not alice's to reuse
        created = alice.create_application("projabc")
        reused = alice.create_application("projabc")
        assert reused.id == created.id
        calls = control.calls()
        assert [c["status"] for c in calls if c["path"] == "/api/applications/"] == [403]
        assert paths(calls)[-2:] == ["GET /api/user/alice", f"GET /api/applications/{state.user_ids['alice']}"]
        control.close()
