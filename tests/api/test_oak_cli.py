"""``flops api`` as the oak CLI meets it: a real ``flops api`` process, a Mosquitto broker, the manager and
three ``flops agent`` processes (``tests/fleet_support.py``), real builds and Flower rounds. Every request is
one the oak CLI sends (its paths, headers and bodies; ``tests/api/support.py``), with the original SLA files.

One project runs to completion (mock data pushed through ``/api/flops/mocks`` first, under the original's
``mnist`` tag); the other tests cost no training: one failing project (preparation deadline) for the reset,
refusals for the rest.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flops.client import Client
from flops.messages import ProjectState
from flops.settings import BrokerAddress
from tests.api.support import ApiProc
from tests.base_support import held_out_digits, invoke_model
from tests.fleet_support import LEARNERS, Fleet, running_fleet

ORIGINALS = Path(__file__).resolve().parent.parent / "fixtures" / "original_slas"
PROJECT_SLA = ORIGINALS / "current" / "projects" / "mnist_sklearn_small.SLA.json"
MOCK_SLA = Path(__file__).resolve().parent / "fixtures" / "mnist_multi.json"
PROJECT_TIMEOUT = 300.0  # includes a cold runtime-base build on a fresh machine
TRACKING_URL = "http://127.0.0.1:5005"
ADMIN_TOKEN = "admin-token-" + "a" * 24
ALICE_TOKEN = "alice-token-" + "b" * 24
ALICE_PASSWORD = "alice-password"
ENDPOINTS = (
    ("POST", "/api/flops/projects"),
    ("POST", "/api/flops/mocks"),
    ("GET", "/api/flops/tracking"),
    ("DELETE", "/api/flops/database"),
)


@pytest.fixture(scope="module")
def fleet(broker: BrokerAddress, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(broker, tmp_path_factory.mktemp("api_fleet"), {"FLOPS_AGENT_GRACE_S": "3"}) as fleet:
        yield fleet


@pytest.fixture(scope="module")
def api(fleet: Fleet) -> Iterator[ApiProc]:
    """``flops api`` beside the manager (its store for the reset), holding the agents' data admin tokens."""
    home = fleet.tmp / "api"
    home.mkdir()
    tokens = home / "tokens.json"
    tokens.write_text(
        json.dumps(
            {
                "customers": {
                    # The oak CLI's default credentials (Admin/Admin), as an administrator.
                    "Admin": {"token": ADMIN_TOKEN, "admin": True, "password": "Admin"},
                    "alice": {"token": ALICE_TOKEN, "password": ALICE_PASSWORD},
                }
            }
        )
    )
    env = {
        "FLOPS_BROKER_URL": fleet.broker.url,
        "FLOPS_DATA_DIR": str(fleet.manager.data_dir),
        "FLOPS_API_TOKENS_FILE": str(tokens),
        "FLOPS_API_AGENT_DIRS": json.dumps([str(a.home) for a in fleet.agents.values()]),
        "FLOPS_TRACKING_URI": TRACKING_URL,
    }
    proc = ApiProc(home, env).start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class OakProject:
    project_id: str
    state: ProjectState
    mock_seconds: float
    project_seconds: float


@pytest.fixture(scope="module")
def oak_project(fleet: Fleet, api: ApiProc) -> OakProject:
    """``oak addon flops mock-data mnist_multi.json`` (Admin), then ``oak addon flops project
    mnist_sklearn_small.SLA.json`` (alice) with the file as shipped but for its repo URL: the original
    GitHub repo is replaced by the example repo (tests run offline)."""
    # Each oak command logs in first (`oak config credentials …`; Admin/Admin by default) and sends that token.
    admin, alice = api.go_login("Admin", "Admin"), api.go_login("alice", ALICE_PASSWORD)
    assert (admin.status, alice.status) == (200, 200), (admin.body, alice.body)
    started = time.monotonic()
    mocked = api.go_post("/api/flops/mocks", admin.body["token"], json.loads(MOCK_SLA.read_text()))
    assert mocked.status == 200, (mocked.body, api.log_tail())
    assert mocked.body["message"] == "New Mock-Data-Provider started successfully"
    assert mocked.body["data_tag"] == "mnist" and mocked.body["dataset"] == "digits"
    assert [p["agent_id"] for p in mocked.body["partitions"]] == list(LEARNERS)
    fleet.feed.wait_agents(list(LEARNERS), tag="mnist")
    mock_seconds = time.monotonic() - started

    sla = json.loads(PROJECT_SLA.read_text())
    sla["ml_repo_url"] = fleet.repo_url
    started = time.monotonic()
    answer = api.go_post("/api/flops/projects", alice.body["token"], sla)
    assert answer.status == 200, (answer.body, api.log_tail())
    assert answer.body["message"] == "New FLOps project started successfully"
    project_id = answer.body["project_id"]
    state = fleet.feed.wait_finished(project_id, PROJECT_TIMEOUT)
    return OakProject(project_id, state, mock_seconds, time.monotonic() - started)


def _project_ids(store: Path) -> set[str]:
    with sqlite3.connect(store) as db:
        return {row[0] for row in db.execute("SELECT project_id FROM projects")}


# --- a project through the API ------------------------------------------------------------------------------


def test_project_submitted_like_the_oak_cli_runs_to_completion(fleet: Fleet, oak_project: OakProject) -> None:
    project_id, state = oak_project.project_id, oak_project.state
    assert state.outcome is not None and state.outcome.value == "completed", (
        f"{state.outcome} in {state.failed_stage}: {state.reason}\n" + "\n".join(fleet.feed.messages(project_id))
    )
    # The token's customer owns it, although the original file says "customerID": "Admin".
    assert state.customer == "alice"
    rounds = fleet.feed.events(project_id, "round.completed")
    assert [e.data["round"] for e in rounds] == [1, 2, 3]
    # The learners trained on what /api/flops/mocks pushed under the original's tag: each node's partition.
    examples = {
        e.data["agent_id"]: e.data["examples"]
        for e in fleet.feed.events(project_id)
        if "examples" in e.data and "agent_id" in e.data
    }
    assert examples and all(n > 0 for n in examples.values()), examples
    # Both post-training steps of the original file: a served model that knows held-out digits.
    assert state.model_url, state
    x_test, y_test = held_out_digits()
    accuracy = float((invoke_model(state.model_url, x_test, state.model_token) == y_test).mean())
    assert accuracy >= 0.85, f"served model accuracy {accuracy:.3f}"
    print(
        f"\nmock data pushed in {oak_project.mock_seconds:.1f} s; project via the API finished in "
        f"{oak_project.project_seconds:.1f} s; held-out accuracy {accuracy:.3f}"
    )


def test_the_oak_cli_logs_in_with_the_credentials_of_the_tokens_file(api: ApiProc) -> None:
    assert api.go_login("alice", ALICE_PASSWORD).body == {"token": ALICE_TOKEN}
    for username, password in (("alice", "Admin"), ("bob", ALICE_PASSWORD), ("Admin", "")):
        refused = api.go_login(username, password)
        assert refused.status in (401, 422) and "token" not in refused.body, refused.body
    assert api.go_login("alice", "wrong").body == {"message": "wrong username or password"}


def test_tracking_answers_the_tracking_server_url(api: ApiProc) -> None:
    # The current oak CLI: ?customerID=Admin (its default); the older Python one: a JSON body, with a slash.
    go = api.go_get("/api/flops/tracking", ALICE_TOKEN, {"customerID": "Admin"})
    assert (go.status, go.body) == (200, {"tracking_server_url": TRACKING_URL})
    python = api.python_request("GET", "/api/flops/tracking/", ALICE_TOKEN, {"customerID": "alice"})
    assert (python.status, python.body) == (200, {"tracking_server_url": TRACKING_URL})
    # Someone else's tracking server: only for administrators.
    other = api.go_get("/api/flops/tracking/", ALICE_TOKEN, {"customerID": "bob"})
    assert other.status == 403 and "own tracking server" in other.body["message"]
    admin = api.go_get("/api/flops/tracking", ADMIN_TOKEN, {"customerID": "bob"})
    assert admin.status == 200 and admin.body["tracking_server_url"] == TRACKING_URL


def test_a_customer_may_not_reset_the_database_or_push_mock_data(
    fleet: Fleet, api: ApiProc, oak_project: OakProject
) -> None:
    before = _project_ids(fleet.manager.data_dir / "manager.sqlite3")
    for path in ("/api/flops/database", "/api/flops/database/"):
        refused = api.go_delete(path, ALICE_TOKEN, {"customerID": "Admin"})
        assert refused.status == 403, refused.body
        assert (
            refused.body["message"] == "only administrators may reset the FLOps database (customer 'alice' is not one)"
        )
    mock = api.go_post("/api/flops/mocks/", ALICE_TOKEN, json.loads(MOCK_SLA.read_text()))
    assert mock.status == 403 and "only administrators may push mock data" in mock.body["message"]
    # Nothing was forgotten: the store and the broker still hold the finished project.
    assert _project_ids(fleet.manager.data_dir / "manager.sqlite3") == before
    with Client(fleet.broker) as client:
        assert client.state(oak_project.project_id).outcome is not None


def test_an_admin_reset_forgets_finished_projects_and_keeps_served_models(
    fleet: Fleet, api: ApiProc, oak_project: OakProject
) -> None:
    # A project that finishes without a model: it asks for more learners than the fleet has, and waits 1 s.
    sla = fleet.sla(min_available_clients=5, min_fit_clients=5, min_evaluate_clients=5, deadlines={"preparation": 1})
    del sla["customerID"]  # the example's "demo": without one, the project is the token's customer's
    answer = api.go_post("/api/flops/projects/", ALICE_TOKEN, sla)
    assert answer.status == 200, answer.body
    failed_id = answer.body["project_id"]
    failed = fleet.feed.wait_finished(failed_id, 60)
    assert failed.outcome is not None and failed.outcome.value == "failed", failed
    store = fleet.manager.data_dir / "manager.sqlite3"
    assert {failed_id, oak_project.project_id} <= _project_ids(store)

    reset = api.go_delete("/api/flops/database", ADMIN_TOKEN, {"customerID": "Admin"})
    assert reset.status == 200, reset.body
    assert reset.body["message"] == "Successfully reset the database."
    assert failed_id in reset.body["forgotten_projects"]
    assert oak_project.project_id not in reset.body["forgotten_projects"]

    # Gone from the manager's store and from what `flops project list` shows; the served model stays.
    assert failed_id not in _project_ids(store) and oak_project.project_id in _project_ids(store)
    with Client(fleet.broker) as client:
        listed = {s.project_id for s in client.states()}
    assert failed_id not in listed and oak_project.project_id in listed
    assert oak_project.state.model_url
    x_test, _ = held_out_digits()
    assert len(invoke_model(oak_project.state.model_url, x_test[:5], oak_project.state.model_token)) == 5

    # Again, from the older Python CLI (body with customerID): nothing left to forget.
    again = api.python_request("DELETE", "/api/flops/database/", ADMIN_TOKEN, {"customerID": "Admin"})
    assert (again.status, again.body["forgotten_projects"]) == (200, [])


# --- refusals ---------------------------------------------------------------------------------------------------


def test_a_bad_sla_is_refused_with_field_errors_and_creates_nothing(fleet: Fleet, api: ApiProc) -> None:
    store = fleet.manager.data_dir / "manager.sqlite3"
    before = _project_ids(store), set(fleet.feed.projects)
    sla = json.loads(PROJECT_SLA.read_text())
    sla["ml_repo_url"] = "ftp://example.org/repo"
    sla["training_configuration"]["training_rounds"] = 0
    sla["post_training_steps"] = ["deploy_trained_model_image"]
    for path in ("/api/flops/projects", "/api/flops/projects/"):
        refused = api.go_post(path, ALICE_TOKEN, sla)
        assert refused.status == 422, refused.body
        fields = {e["field"]: e["message"] for e in refused.body["errors"]}
        assert set(fields) == {"ml_repo_url", "training_configuration.training_rounds", "post_training_steps"}
        assert "git URL" in fields["ml_repo_url"]
        assert "greater than or equal to 1" in fields["training_configuration.training_rounds"]
        assert "needs build_image_for_trained_model" in fields["post_training_steps"]
    # Another customer's SLA, a body that is not JSON, an unknown mock dataset.
    other = api.go_post(
        "/api/flops/projects", ALICE_TOKEN, {**json.loads(PROJECT_SLA.read_text()), "customerID": "bob"}
    )
    assert other.status == 422 and other.body["errors"][0]["field"] == "customerID"
    garbage = api.send("POST", "/api/flops/projects", {"Authorization": f"Bearer {ALICE_TOKEN}"}, b"{not json")
    assert garbage.status == 400 and garbage.body["errors"][0]["field"] == "(body)"
    cifar = json.loads((ORIGINALS / "mocks" / "cifar10_simple.SLA.json").read_text())
    mock = api.go_post("/api/flops/mocks", ADMIN_TOKEN, cifar)
    assert mock.status == 422 and mock.body["errors"][0]["field"] == "mock_data_configuration.dataset_name"
    # Refused before anything was published: no project in the manager's store, none on the broker.
    assert (_project_ids(store), set(fleet.feed.projects)) == before


@pytest.mark.parametrize("slash", ["", "/"])
@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
def test_a_missing_or_unknown_token_is_refused_with_401(
    fleet: Fleet, api: ApiProc, method: str, path: str, slash: str
) -> None:
    store = fleet.manager.data_dir / "manager.sqlite3"
    before = _project_ids(store)
    body = PROJECT_SLA.read_bytes() if method == "POST" else json.dumps({"customerID": "Admin"}).encode()
    for headers in (
        {},
        {"Authorization": "Bearer not-a-known-token-at-all"},
        {"Authorization": f"Basic {ALICE_TOKEN}"},
        {"Authorization": "Bearer "},
    ):
        answer = api.send(method, path + slash, {"Content-Type": "application/json", **headers}, body)
        assert answer.status == 401, (headers, answer.body)
        assert answer.headers.get("www-authenticate", "").startswith("Bearer")
        assert "token" in answer.body["message"]
    assert _project_ids(store) == before
