"""Retention: the engine forgets projects finished more than ``retention_days`` ago and clears their
retained states; projects still running are never forgotten."""

from __future__ import annotations

from pathlib import Path

import pytest

from flops import topics
from flops.lifecycle_stages import Stage
from flops.retention import DAY_S
from flops.settings import Settings
from flops.store_sqlite import SQLiteStore
from tests.engine_support import EngineHarness


@pytest.fixture(params=["memory", "sqlite"])
def h(request: pytest.FixtureRequest, tmp_path: Path) -> EngineHarness:
    store = None if request.param == "memory" else SQLiteStore(tmp_path / "m.sqlite3")
    return EngineHarness(tmp_path, store=store, retention_days=2)


def test_retention_days_defaults_to_thirty_and_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().retention_days == 30
    monkeypatch.setenv("FLOPS_RETENTION_DAYS", "0.5")
    assert Settings().retention_days == 0.5


def test_prune_forgets_projects_finished_longer_ago_and_clears_their_retained_state(h: EngineHarness) -> None:
    h.fleet(2)
    done = h.submit()
    h.cancel(done)
    h.clock.advance(DAY_S)
    running = h.submit()
    recent = h.submit()
    h.cancel(recent)
    h.clock.advance(1.5 * DAY_S)  # done finished 2.5 days ago, recent 1.5 days ago

    items = h.engine.prune()

    assert [(i.key, i.topic, i.payload, i.retain) for i in items] == [
        (f"state:{done}", topics.project_state("tests", done), b"", True)
    ]
    assert h.store.get(done) is None and h.store.transitions(done) == []
    assert h.store.get(recent) is not None and h.stage(running) is Stage.PREPARATION
    # Committed to the outbox (replacing the state not yet sent), so a crash before publishing loses nothing.
    assert [i for i in h.store.outbox() if i.key == f"state:{done}"] == items
    h.store.sent(items)
    assert h.engine.prune() == []
    # The project's own events still reach a late reader as a plain rejection, not a crash.
    assert h.cancel(done).verdict == "reject"


def test_prune_at_an_explicit_time_never_touches_running_projects(h: EngineHarness) -> None:
    h.fleet(2)
    running = h.submit()
    assert h.engine.prune(h.clock() + 365 * DAY_S) == []
    assert h.stage(running) is Stage.PREPARATION
    h.clock.advance(365 * DAY_S)
    assert h.check_deadlines()  # it times out, and only then becomes prunable
    assert h.engine.prune(h.clock() + 2 * DAY_S + 1)[0].key == f"state:{running}"
