"""``flops api`` in production mode: a broker from ``flops setup production`` (TLS, passwords, per-user ACL),
the manager with its own identity, and the API acting for each token's customer with that customer's env
file. The manager's identity may not publish project requests, so a project accepted through the API
proves the request went out as its customer; the reset clears retained states as the manager."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flops import topics
from flops.broker import free_port
from flops.client import Client
from flops.settings import Settings
from tests.api.support import ApiProc
from tests.base_support import ProjectFeed
from tests.prod_support import bus, env_of, mosquitto, setup_production
from tests.support import ManagerProcess

ALICE = "alice-token-" + "c" * 24
OPS = "ops-token-" + "d" * 24


def _settings(directory: Path, name: str) -> Settings:
    return Settings(**{k.removeprefix("FLOPS_").lower(): v for k, v in env_of(directory, name).items()})


def _client(directory: Path, name: str) -> Client:
    settings = _settings(directory, name)
    return Client(settings.broker(), **settings.broker_tls_files())


@dataclass
class Production:
    directory: Path
    api: ApiProc
    feed: ProjectFeed
    store: Path


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    root = tmp_path_factory.mktemp("api_production")
    directory = root / "flops"
    setup_production(directory, "--port", str(free_port()), "--customers", "alice", "--operators", "ops")
    (directory / "tokens.json").write_text(
        json.dumps(
            {
                "customers": {
                    "alice": {"token": ALICE, "env_file": "env/alice.env"},
                    "ops": {"token": OPS, "admin": True, "env_file": "env/ops.env"},
                }
            }
        )
    )
    manager_env = env_of(directory, "manager")
    address = _settings(directory, "manager").broker()
    with mosquitto(directory):
        manager = ManagerProcess(
            address, root / "manager", manager_env, watcher=lambda: bus(directory, "manager", [topics.manager_status()])
        )
        ops = _settings(directory, "ops")
        feed = ProjectFeed(ops.broker(), **ops.broker_tls_files())
        # The API's own identity is the manager's (it runs beside it, for the reset); customers get theirs.
        api = ApiProc(
            root / "api",
            {
                **manager_env,
                "FLOPS_DATA_DIR": str(root / "manager"),
                "FLOPS_API_TOKENS_FILE": str(directory / "tokens.json"),
            },
        )
        try:
            manager.start()
            api.start()
            yield Production(directory, api, feed, root / "manager" / "manager.sqlite3")
        finally:
            api.stop()
            manager.stop()
            feed.close()


def test_requests_go_out_as_the_tokens_customer_and_the_admin_reset_clears_them(production: Production) -> None:
    api, feed = production.api, production.feed
    sla = {"ml_repo_url": "file:///nonexistent/repo", "ml_model_flavor": "sklearn", "deadlines": {"preparation": 1}}
    answer = api.go_post("/api/flops/projects", ALICE, {"customerID": "Admin", **sla})
    assert answer.status == 200, (answer.body, api.log_tail())
    project_id = answer.body["project_id"]
    state = feed.wait_finished(project_id, 60)
    assert state.customer == "alice" and state.outcome is not None and state.outcome.value == "failed"
    with _client(production.directory, "alice") as alice:
        assert alice.state(project_id).customer == "alice"

    refused = api.go_delete("/api/flops/database", ALICE, {"customerID": "Admin"})
    assert refused.status == 403, refused.body
    reset = api.go_delete("/api/flops/database/", OPS, {"customerID": "Admin"})
    assert (reset.status, reset.body["forgotten_projects"]) == (200, [project_id]), (reset.body, api.log_tail())
    with _client(production.directory, "ops") as ops:
        assert project_id not in {s.project_id for s in ops.states()}

    # No tracking server in this deployment: said so, with a 404.
    tracking = api.go_get("/api/flops/tracking", ALICE, {"customerID": "Admin"})
    assert tracking.status == 404 and "FLOPS_TRACKING_URI" in tracking.body["message"]
