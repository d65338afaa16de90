"""The web view in production (``flops setup production``: TLS, passwords, per-identity ACL): every page asks
for the broker credentials, a wrong password is refused by the broker, a customer sees only their own
projects and an operator sees every project and the agents' liveness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flops import topics
from flops.broker import free_port
from flops.lifecycle_stages import Stage
from flops.messages import AgentStatus, ProjectEvent, ProjectState
from tests.prod_support import bus, env_of, mosquitto, setup_production
from tests.ui.support import UiProc

WAIT_MS = 20_000


@pytest.fixture(scope="module")
def production_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiProc]:
    tmp = tmp_path_factory.mktemp("ui_login")
    directory = tmp / "flops"
    setup_production(
        directory,
        *("--agents", "node-1", "--customers", "alice,bob", "--operators", "ops", "--port", str(free_port())),
    )
    with mosquitto(directory):
        # What a manager would have published (retained), and one agent's birth.
        manager = bus(directory, "manager")
        for customer, project_id in (("alice", "p-alice1"), ("bob", "p-bob1")):
            state = ProjectState(
                project_id=project_id,
                stage=Stage.LEARNERS,
                customer=customer,
                seq=2,
                stage_timestamps={"preparation_at": 1.0, "learners_at": 2.0},
            )
            manager.publish_wait(topics.project_state(customer, project_id), state.to_bytes(), retain=True)
        manager.close()
        agent = bus(directory, "node-1")
        birth = AgentStatus(agent_id="node-1", online=True).to_bytes()
        agent.publish_wait(topics.agent_status("node-1"), birth, retain=True)
        agent.close()
        ops = env_of(directory, "ops")
        # The view's own settings name the broker and its CA only: identities come from the login form.
        env = {"FLOPS_BROKER_URL": ops["FLOPS_BROKER_URL"], "FLOPS_BROKER_CA_FILE": ops["FLOPS_BROKER_CA_FILE"]}
        ui = UiProc(tmp, env).start()
        ui.passwords = {  # type: ignore[attr-defined]
            name: env_of(directory, name)["FLOPS_BROKER_PASSWORD"] for name in ("alice", "ops")
        }
        ui.directory = directory  # type: ignore[attr-defined]
        try:
            yield ui
        finally:
            ui.stop()


def _login(page: Any, ui: UiProc, username: str, password: str) -> None:
    page.goto(ui.url)
    assert page.url.endswith("/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_a_wrong_password_is_refused_and_nothing_is_shown_without_login(production_ui: UiProc, page: Any) -> None:
    _login(page, production_ui, "alice", "not-her-password")
    assert "refused" in page.get_by_role("alert").inner_text()
    response = page.request.get(f"{production_ui.url}/api/projects")
    assert response.status == 401


def test_a_customer_sees_only_their_projects(production_ui: UiProc, page: Any) -> None:
    _login(page, production_ui, "alice", production_ui.passwords["alice"])  # type: ignore[attr-defined]
    page.wait_for_selector('tr[data-project="p-alice1"]', timeout=WAIT_MS)
    assert page.locator("tr[data-project]").count() == 1
    assert page.request.get(f"{production_ui.url}/api/projects/p-bob1").status == 404


def test_an_operator_sees_every_project_and_agent_liveness(production_ui: UiProc, page: Any) -> None:
    directory: Path = production_ui.directory  # type: ignore[attr-defined]
    _login(page, production_ui, "ops", production_ui.passwords["ops"])  # type: ignore[attr-defined]
    page.wait_for_selector('tr[data-project="p-bob1"]', timeout=WAIT_MS)
    assert page.locator('tr[data-project="p-alice1"]').count() == 1
    # A learner command for bob's project names node-1: the page shows its liveness.
    manager = bus(directory, "manager")
    sent = ProjectEvent(
        project_id="p-bob1", seq=3, kind="report.accepted", data={"command": "run_learner", "agent_id": "node-1"}
    )
    manager.publish_wait(topics.project_events("bob", "p-bob1"), sent.to_bytes())
    manager.close()
    page.get_by_role("link", name="p-bob1").click()
    page.wait_for_selector('#agents tr[data-agent="node-1"]', timeout=WAIT_MS)
    assert "online" in page.locator('#agents tr[data-agent="node-1"]').inner_text()
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url(f"{production_ui.url}/login", timeout=WAIT_MS)
