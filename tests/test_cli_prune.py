"""``flops project prune`` against a real broker: forgets old finished projects in the manager's store and
clears their retained states, so ``flops project list`` no longer shows them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.lifecycle_stages import Outcome, Stage
from flops.messages import ProjectState, new_id
from flops.retention import DAY_S
from flops.settings import BrokerAddress
from flops.store import ProjectRecord
from flops.store_sqlite import SQLiteStore
from tests.support import cli


def _record(project_id: str, days_ago: float, stage: Stage = Stage.FINISHED) -> ProjectRecord:
    at = time.time() - days_ago * DAY_S
    finished = stage is Stage.FINISHED
    return ProjectRecord(
        project_id=project_id,
        stage=stage,
        sla={"customerID": "tests"},
        created_at=at - 3600,
        stage_entered_at=at,
        outcome=Outcome.COMPLETED if finished else None,
        timestamps={f"{stage.value}_at": at},
    )


# The broker is shared by the session: this module's projects get a suffix of their own.
RUN = new_id("x")
OLD, RECENT, RUNNING = f"p-old-{RUN}", f"p-recent-{RUN}", f"p-running-{RUN}"


@pytest.fixture
def data_dir(broker: BrokerAddress, tmp_path: Path) -> Path:
    """A manager store and the broker's retained states for: a project finished 40 days ago, one finished
    a day ago, and one running for 100 days."""
    records = [_record(OLD, 40), _record(RECENT, 1), _record(RUNNING, 100, Stage.AGGREGATION)]
    data_dir = tmp_path / "manager"
    store = SQLiteStore(data_dir / "manager.sqlite3")
    with Bus(broker, BusOptions(client_id=new_id("test-states"))) as bus:
        for r in records:
            with store.unit() as unit:
                unit.insert(r)
            state = ProjectState(project_id=r.project_id, stage=r.stage, outcome=r.outcome)
            bus.publish_wait(topics.project_state(r.sla["customerID"], r.project_id), state.to_bytes(), retain=True)
    store.close()
    return data_dir


def _listed(broker: BrokerAddress) -> list[str]:
    done = cli(broker, "project", "list", "--json")
    assert done.returncode == 0, done.stderr
    return sorted(p["project_id"] for p in json.loads(done.stdout) if p["project_id"].endswith(RUN))


def test_prune_forgets_old_finished_projects_and_clears_their_retained_state(
    broker: BrokerAddress, data_dir: Path
) -> None:
    assert _listed(broker) == [OLD, RECENT, RUNNING]

    done = cli(broker, "project", "prune", "--older-than", "30", "--json", data_dir=data_dir)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"older_than_days": 30, "projects": [OLD], "artifacts": []}
    assert _listed(broker) == [RECENT, RUNNING]
    store = SQLiteStore(data_dir / "manager.sqlite3")
    try:
        assert store.get(OLD) is None
        assert store.get(RECENT) is not None and store.get(RUNNING) is not None
        assert store.outbox() == []  # every clearing message was acknowledged by the broker
    finally:
        store.close()


def test_prune_defaults_to_the_retention_setting(
    broker: BrokerAddress, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOPS_RETENTION_DAYS", "0.5")
    done = cli(broker, "project", "prune", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    assert "pruned 2 projects and 0 cached artifacts older than 0.5 days" in done.stdout
    assert OLD in done.stdout and RECENT in done.stdout
    assert _listed(broker) == [RUNNING]


def test_prune_without_a_manager_store_says_where_it_looked(broker: BrokerAddress, tmp_path: Path) -> None:
    done = cli(broker, "project", "prune", data_dir=tmp_path / "nowhere")
    assert done.returncode == 1
    assert "no manager store at" in done.stderr and "nowhere" in done.stderr
    assert not (tmp_path / "nowhere").exists()
