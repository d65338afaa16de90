"""The web view in headless Chromium against a real manager process, with test-side workers playing the
agents: the projects list shows a running project, a failed project shows its reason and log tail, and the
JSON and security headers are what the pages are built from."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from flops.client import Client
from flops.settings import BrokerAddress
from flops.sla import ProjectSLA
from tests.support import FakeWorkers, ManagerProcess, make_git_repo, sla
from tests.ui.support import UiProc

WAIT_MS = 20_000


def _submit(broker: BrokerAddress, body: dict[str, Any]) -> str:
    with Client(broker) as client:
        reply = client.submit(ProjectSLA.model_validate(body))
    assert reply.project_id, reply.errors
    return reply.project_id


def test_projects_list_shows_a_running_project_and_follows_it_live(
    broker: BrokerAddress, manager: ManagerProcess, workers: FakeWorkers, ui: UiProc, page: Any, tmp_path: Any
) -> None:
    workers.fleet(2)
    page.goto(ui.url)
    page.wait_for_selector("#live.on", timeout=WAIT_MS)
    project_id = _submit(broker, sla(make_git_repo(tmp_path / "repo")))
    # The build command is never answered: the project stays running in the builder stage.
    workers.next_command("build")
    row = page.locator(f'tr[data-project="{project_id}"]')
    row.wait_for(timeout=WAIT_MS)
    page.wait_for_function(
        "id => document.querySelector(`tr[data-project=\"${id}\"]`)?.dataset.stage === 'builder'",
        arg=project_id,
        timeout=WAIT_MS,
    )
    assert row.get_attribute("data-outcome") == ""
    assert "tests" in row.inner_text()  # the customer
    row.get_by_role("link", name=project_id).click()
    page.wait_for_selector('#timeline li[data-stage="builder"].current', timeout=WAIT_MS)
    assert page.locator("#timeline li[data-stage]").count() == 3  # preparation, start, builder
    assert page.locator("#agents tr[data-agent]").count() == 1  # the builder it was sent to


def test_a_failed_project_shows_its_reason_and_log_tail(
    broker: BrokerAddress, manager: ManagerProcess, workers: FakeWorkers, ui: UiProc, page: Any, tmp_path: Any
) -> None:
    workers.fleet(2)
    project_id = _submit(broker, sla(make_git_repo(tmp_path / "repo")))
    page.goto(f"{ui.url}/projects/{project_id}")
    page.wait_for_selector('#timeline li[data-stage="builder"]', timeout=WAIT_MS)
    build = workers.next_command("build")
    workers.report(
        build, "build.failed", reason="pip could not resolve torch==0.0.1", log_tail="ERROR: No matching distribution"
    )
    page.wait_for_selector("#failure", timeout=WAIT_MS)
    assert "pip could not resolve torch==0.0.1" in page.locator("#failure-reason").inner_text()
    assert "ERROR: No matching distribution" in page.locator("#log-tail").inner_text()
    assert page.locator("#failure h2").inner_text() == "Failed in builder"
    assert page.locator('[data-testid="stage"]').first.inner_text() == "finished · failed"

    with urllib.request.urlopen(f"{ui.url}/api/projects/{project_id}", timeout=5) as response:
        detail = json.loads(response.read())
        headers = response.headers
    assert detail["failure"]["stage"] == "builder"
    assert [r["stage"] for r in detail["timeline"]] == ["preparation", "start", "builder", "finished"]
    assert "default-src 'self'" in headers["Content-Security-Policy"]
