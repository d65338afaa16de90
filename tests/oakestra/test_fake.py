"""The fake System Manager answers like the real one (paths, bodies, codes of the contract), its scripts move as
told, and it runs on its own as ``python -m flops.oakestra.fake``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from flops.oakestra.client import ServiceSpec, SystemManager
from flops.oakestra.fake import FakeSystemManager
from flops.oakestra.fake_state import FakeState
from flops.ports import free_port, port_open
from tests.oakestra.support import FakeControl
from tests.support import REPO_ROOT, terminate, wait_until

HEX24 = re.compile(r"^[0-9a-f]{24}$")


@pytest.fixture
def http(fake: FakeSystemManager) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.url, timeout=5) as client:
        token = client.post("/api/auth/login", json={"username": "Admin", "password": "Admin"}).json()["token"]
        client.headers["Authorization"] = f"Bearer {token}"
        yield client


def sla(app_id: str = "", name: str = "projabc", services: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "sla_version": "v2.0",
        "customerID": "Admin",
        "applications": [
            {
                "applicationID": app_id,
                "application_name": name,
                "application_namespace": "flops",
                "application_desc": "",
                "microservices": services or [],
            }
        ],
    }


def microservice(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "microserviceID": "",
        "microservice_name": name,
        "microservice_namespace": "flops",
        "virtualization": "container",
        "code": "img",
        **extra,
    }


def test_bodies_and_codes_are_the_real_ones(http: httpx.Client) -> None:
    created = http.post("/api/application/", json=sla())
    assert created.status_code == 200 and isinstance(json.loads(created.text), str)  # double-encoded
    (app,) = json.loads(created.json())
    assert HEX24.match(app["applicationID"]) and app["_id"] == {"$oid": app["applicationID"]}
    assert http.post("/api/application/", json=sla()).json() == {"code": 409, "status": "Conflict"}
    assert http.post("/api/application/", json=sla(name="proj-abc")).status_code == 422
    assert http.get(f"/api/application/{app['applicationID']}").json() is None  # the real one's bug
    assert http.post("/api/service/", json=sla("0" * 24, services=[microservice("a")])).json() == {
        "code": 400,
        "status": "Bad Request",
    }

    first = http.post("/api/service/", json=sla(app["applicationID"], services=[microservice("learner")])).json()
    again = http.post("/api/service/", json=sla(app["applicationID"], services=[microservice("learner")])).json()
    assert first["job_id"] == again["job_id"] and first["failed_services"] == []  # same name: an upsert
    service = json.loads(http.get(f"/api/service/{first['job_id']}").json())
    assert service["job_name"] == "projabc.flops.learner.flops" and service["virtualization"] == "docker"
    assert service["instance_list"] == []

    assert http.post(f"/api/service/{'f' * 24}/instance").json() == {"message": "ok"}  # unknown id: ok anyway
    assert http.delete(f"/api/service/{first['job_id']}/instance/x").status_code == 500
    assert http.put(f"/api/service/{first['job_id']}", json={}).status_code == 501
    assert http.delete(f"/api/application/{app['applicationID']}").json() == {"message": "Application Deleted"}
    assert http.delete(f"/api/application/{app['applicationID']}").status_code == 501
    assert http.get(f"/api/service/{first['job_id']}").json() == {"code": 404, "status": "Not Found"}


def test_each_decorator_refuses_a_bad_token_its_own_way(fake: FakeSystemManager) -> None:
    with httpx.Client(base_url=fake.url, timeout=5) as http:
        assert http.get("/api/applications/").json() == {"msg": "Missing Authorization Header"}
        bad = http.get("/api/applications/", headers={"Authorization": "Bearer forged"})
        assert bad.status_code == 422
        unauth = http.get(f"/api/service/{'a' * 24}", headers={"Authorization": "Bearer forged"})
        assert (unauth.status_code, unauth.json()) == (401, {"message": "Missing authentication token"})
        assert http.post("/api/auth/login", content=b"not json").status_code == 403


def test_instances_follow_their_script_per_poll_or_per_tick(
    sm: SystemManager, control: FakeControl, http: httpx.Client
) -> None:
    control.script("^a", steps=["CLUSTER_SCHEDULED", "NODE_SCHEDULED", "RUNNING"], polls_per_step=2)
    control.script("^b", "oneshot_ok", polls_per_step=0)
    app = sm.create_application("projabc")
    a = sm.create_service(app, ServiceSpec("a", "img"))
    b = sm.create_service(app, ServiceSpec("b", "img", one_shot=True))
    for service_id in (a, b):
        sm.deploy_instance(service_id)

    def status(service_id: str) -> tuple[str, list[str]]:
        doc = sm.service(service_id)
        assert doc is not None
        return doc.status, [i.status for i in doc.instances]

    seen = [status(a) for _ in range(6)]
    assert (
        seen
        == [("REQUESTED", [])] * 2
        + [("CLUSTER_SCHEDULED", ["CLUSTER_SCHEDULED"])] * 2
        + [("NODE_SCHEDULED", ["NODE_SCHEDULED"])] * 2
    )
    assert status(b) == status(b) == ("REQUESTED", [])  # polls_per_step 0: only ticks move it
    control.tick(4)
    assert status(b) == ("COMPLETED", ["COMPLETED"])

    sm.deploy_instance(a)  # a second instance: the service is RUNNING only once both are
    control.tick(1)
    assert status(a) == ("CLUSTER_SCHEDULED", ["RUNNING", "CLUSTER_SCHEDULED"])
    control.tick(2)
    assert status(a) == ("RUNNING", ["RUNNING", "RUNNING"])
    doc = sm.service(a)
    assert doc is not None and [i.number for i in doc.instances] == [0, 1]


class SlowContainer:
    """Stands in for a podman container whose stop takes its grace period: it returns only once all three of an
    application's containers are stopping at the same time (one after the other, the barrier times out)."""

    def __init__(self, barrier: threading.Barrier) -> None:
        self.barrier = barrier
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.barrier.wait()
            self.stopped = True


def test_deleting_an_application_stops_its_containers_side_by_side() -> None:
    """Seven containers stopped one after the other outlasted the client's 10 s timeout (the hierarchical demo)."""
    state = FakeState()
    app = state.create_app("Admin", {"application_name": "projabc", "application_namespace": "flops"})
    assert app is not None
    barrier = threading.Barrier(3, timeout=20)
    containers = [SlowContainer(barrier) for _ in range(3)]
    for n, container in enumerate(containers):
        service_id, _ = state.create_service(app, microservice(f"aggregator{n}"))
        state.add_instance(service_id)
        state.services[service_id].instances[0].container = container  # type: ignore[assignment]

    assert state.delete_app("Admin", app["applicationID"])
    assert all(c.stopped for c in containers) and state.services == {}


def test_runs_on_its_own_as_a_module() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flops.oakestra.fake", "--port", str(port)],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open("127.0.0.1", port), 20, "the fake System Manager's port")
        with SystemManager(f"http://127.0.0.1:{port}") as sm:
            app = sm.create_application("projabc")
            assert sm.find_application("projabc") == app
            assert [c.name for c in sm.active_clusters()] == ["cluster1"]
    finally:
        terminate(proc)
