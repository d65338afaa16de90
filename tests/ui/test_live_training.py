"""The web view while a real project trains (real manager, agents, builds and Flower rounds): its page,
opened right after the submit and never reloaded, shows the stage timeline advancing and the accuracy plot
gaining a point per round while the aggregation runs; after completion a screenshot of it is saved."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flops.settings import BrokerAddress
from tests.fleet_support import Fleet, running_fleet
from tests.ui.support import UiProc

FIRST_PROJECT_MS = 300_000  # includes a cold runtime-base build on a fresh machine
POINTS = "() => document.querySelectorAll('#plot circle.pt.acc').length"
# The page's stage badge shows "aggregation" while training, "finished · completed" after.
AGGREGATING_WITH = (
    "n => document.querySelectorAll('#plot circle.pt.acc').length >= n"
    " && document.querySelector('[data-testid=stage]')?.textContent.trim() === 'aggregation'"
)
FINISHED = "() => (document.querySelector('[data-testid=stage]')?.textContent || '').includes('finished')"


@pytest.fixture(scope="module")
def fleet(broker: BrokerAddress, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(broker, tmp_path_factory.mktemp("ui_fleet"), {"FLOPS_AGENT_GRACE_S": "3"}) as fleet:
        yield fleet


def test_project_page_follows_real_training_live(fleet: Fleet, ui: UiProc, page: Any, artifacts: Path) -> None:
    project_id = fleet.feed.submit(fleet.sla(training_rounds=3))
    page.goto(f"{ui.url}/projects/{project_id}")
    page.wait_for_selector("#timeline li[data-stage]", timeout=20_000)
    page.evaluate("() => { window.__sameDocument = true; }")
    stages_at_first = page.locator("#timeline li[data-stage]").count()

    # Each wait returns only while the project is still aggregating: the points arrive live, one per round.
    for points in (1, 2):
        page.wait_for_function(AGGREGATING_WITH, arg=points, timeout=FIRST_PROJECT_MS)
        assert page.locator('#timeline li[data-stage="aggregation"].current').count() == 1
    page.wait_for_function(FINISHED, timeout=120_000)

    assert page.evaluate("() => window.__sameDocument") is True, "the page was reloaded"
    assert page.locator('[data-testid="stage"]').first.inner_text() == "finished · completed", page.content()
    assert page.evaluate(POINTS) == 3
    stages = page.locator("#timeline li[data-stage]").evaluate_all("items => items.map(li => li.dataset.stage)")
    assert stages_at_first < len(stages)
    assert stages[0] == "preparation" and stages[-1] == "finished" and "aggregation" in stages
    assert page.locator("#rounds tbody tr").count() == 3
    learners = page.locator("#agents tr[data-agent]").evaluate_all("rows => rows.map(r => r.dataset.agent)")
    assert learners == ["node-0", "node-1", "node-2"]
    assert page.locator("#agents").inner_text().count("online") == 3
    state = fleet.feed.state(project_id)
    assert state is not None and state.progress.accuracy is not None
    shown = page.locator("#rounds tbody tr").last.locator("td").nth(1).inner_text()
    assert shown == f"{state.progress.accuracy:.3f}"
    page.screenshot(path=str(artifacts / "project-completed.png"), full_page=True)
