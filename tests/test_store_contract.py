"""One contract for the store port, run against every adapter (in-memory and SQLite on a temp file)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flops.errors import StaleWrite
from flops.lifecycle_stages import Outcome, Stage
from flops.store import OutboxItem, ProjectRecord, PrunedProject, Store, Transition, Unit, open_store
from flops.store_memory import MemoryStore
from flops.store_sqlite import SQLiteStore


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: _Clock) -> Iterator[Store]:
    s: Store = (
        MemoryStore(clock=clock) if request.param == "memory" else SQLiteStore(tmp_path / "store.sqlite3", clock=clock)
    )
    try:
        yield s
    finally:
        s.close()


def _record(pid: str = "p-1", stage: Stage = Stage.PREPARATION, **changes: object) -> ProjectRecord:
    record = ProjectRecord(
        project_id=pid,
        stage=stage,
        sla={"ml_repo_url": "https://example.org/r.git", "training_configuration": {"data_tags": ["digits"]}},
        created_at=10.0,
        stage_entered_at=11.0,
        deadline_at=611.0,
        ctx={"agents": ["a-1"], "progress": {"round": 1, "rounds": 3}, "nested": {"x": [1, 2, {"y": None}]}},
        timestamps={"preparation_at": 10.0},
        seq=3,
        request_id="r-1",
    )
    return dataclasses.replace(record, **changes)


def _item(key: str, payload: bytes = b"x", topic: str = "flops/v1/t", retain: bool = False) -> OutboxItem:
    return OutboxItem(key, topic, payload, retain)


def _insert(store: Store, record: ProjectRecord) -> None:
    with store.unit() as unit:
        unit.insert(record)


# --- projects ----------------------------------------------------------------------------------------


def test_insert_then_get_returns_the_same_record(store: Store) -> None:
    record = _record(outcome=None, failed_stage=None)
    _insert(store, record)
    assert store.get("p-1") == record
    with store.unit() as unit:
        assert unit.get("p-1") == record
    assert store.get("p-unknown") is None


def test_every_field_round_trips(store: Store) -> None:
    record = _record(
        stage=Stage.FINISHED,
        outcome=Outcome.FAILED,
        reason="timed out in builder after 1800 s\nlog ✓",
        failed_stage=Stage.BUILDER,
        deadline_at=None,
    )
    _insert(store, record)
    got = store.get("p-1")
    assert got == record
    assert got is not None and isinstance(got.stage, Stage) and isinstance(got.outcome, Outcome)


def test_get_returns_a_copy(store: Store) -> None:
    _insert(store, _record())
    got = store.get("p-1")
    assert got is not None
    got.ctx["agents"].append("intruder")
    got.stage = Stage.FINISHED
    assert store.get("p-1") == _record()


def test_insert_of_an_existing_project_is_a_stale_write(store: Store) -> None:
    _insert(store, _record())
    with pytest.raises(StaleWrite):
        _insert(store, _record(seq=99))
    assert store.get("p-1") == _record()


def test_update_compares_and_sets_the_stage(store: Store) -> None:
    _insert(store, _record())
    moved = _record(stage=Stage.BUILDER, seq=7, ctx={"commit": "a" * 40})
    with store.unit() as unit:
        unit.update(moved, Stage.PREPARATION)
    assert store.get("p-1") == moved
    # Same stage again (an event that changed only the context) is fine too.
    again = dataclasses.replace(moved, seq=8)
    with store.unit() as unit:
        unit.update(again, Stage.BUILDER)
    assert store.get("p-1") == again


def test_update_refuses_a_stale_stage_and_leaves_the_row_unchanged(store: Store) -> None:
    _insert(store, _record(stage=Stage.LEARNERS))
    with pytest.raises(StaleWrite) as caught, store.unit() as unit:
        unit.update(_record(stage=Stage.FINISHED, outcome=Outcome.CANCELLED), Stage.BUILDER)
    assert caught.value.project_id == "p-1"
    assert caught.value.expected == Stage.BUILDER
    assert caught.value.found == Stage.LEARNERS
    assert store.get("p-1") == _record(stage=Stage.LEARNERS)


def test_update_of_a_missing_project_is_a_stale_write(store: Store) -> None:
    with pytest.raises(StaleWrite), store.unit() as unit:
        unit.update(_record(), Stage.PREPARATION)
    assert store.get("p-1") is None


def test_unfinished_excludes_finished_projects(store: Store) -> None:
    _insert(store, _record("p-a", Stage.PREPARATION))
    _insert(store, _record("p-b", Stage.AGGREGATION))
    _insert(store, _record("p-c", Stage.FINISHED, outcome=Outcome.COMPLETED))
    assert sorted(r.project_id for r in store.unfinished()) == ["p-a", "p-b"]
    assert sorted(r.project_id for r in store.projects()) == ["p-a", "p-b", "p-c"]
    assert len(store.projects(limit=2)) == 2
    with store.unit() as unit:
        unit.update(_record("p-b", Stage.FINISHED, outcome=Outcome.FAILED), Stage.AGGREGATION)
    assert [r.project_id for r in store.unfinished()] == ["p-a"]


# --- units: all or nothing ---------------------------------------------------------------------------


def _write_everything(unit: Unit, pid: str = "p-1") -> None:
    unit.insert(_record(pid))
    unit.mark_seen(f"e-{pid}", pid, "accept")
    unit.log_transition(Transition(pid, None, Stage.PREPARATION, "create", f"e-{pid}", 1.0))
    unit.enqueue([_item(f"ev:{pid}:1"), _item(f"state:{pid}", retain=True)])
    unit.put_artifact(f"art-{pid}", {"ref": "env://x"})


def _nothing_of(store: Store, pid: str) -> None:
    assert store.get(pid) is None
    assert store.transitions(pid) == []
    assert [i for i in store.outbox() if pid in i.key] == []
    with store.unit() as unit:
        assert unit.seen(f"e-{pid}") is None
        assert unit.get_artifact(f"art-{pid}") is None


def test_a_unit_sees_its_own_writes(store: Store) -> None:
    with store.unit() as unit:
        _write_everything(unit)
        assert unit.seen("e-p-1") == "accept"
        assert unit.get("p-1") == _record()
        assert unit.get_artifact("art-p-1") == {"ref": "env://x"}
    with store.unit() as unit:
        assert unit.seen("e-p-1") == "accept"
        assert unit.seen("e-other") is None


def test_unit_rolls_back_everything_on_exception(store: Store) -> None:
    with pytest.raises(RuntimeError, match="boom"), store.unit() as unit:
        _write_everything(unit)
        raise RuntimeError("boom")
    _nothing_of(store, "p-1")
    # The store is still usable afterwards.
    with store.unit() as unit:
        _write_everything(unit)
    assert store.get("p-1") == _record()


def test_failed_update_rolls_back_the_rest_of_its_unit(store: Store) -> None:
    _insert(store, _record(stage=Stage.BUILDER))
    with pytest.raises(StaleWrite), store.unit() as unit:
        unit.mark_seen("e-late", "p-1", "accept")
        unit.enqueue([_item("cmd:late")])
        unit.update(_record(stage=Stage.LEARNERS), Stage.PREPARATION)
    with store.unit() as unit:
        assert unit.seen("e-late") is None
    assert store.outbox() == []


def test_batch_with_one_failing_unit_keeps_the_others(store: Store) -> None:
    with store.batch():
        with store.unit() as unit:
            _write_everything(unit, "p-1")
        with pytest.raises(RuntimeError), store.unit() as unit:
            _write_everything(unit, "p-2")
            raise RuntimeError("handler bug")
        with store.unit() as unit:
            # A later unit of the batch sees what an earlier one wrote (dedup across one batch).
            assert unit.seen("e-p-1") == "accept"
            assert unit.seen("e-p-2") is None
            _write_everything(unit, "p-3")
    assert store.get("p-1") == _record("p-1")
    assert store.get("p-3") == _record("p-3")
    _nothing_of(store, "p-2")
    assert [i.key for i in store.outbox()] == ["ev:p-1:1", "state:p-1", "ev:p-3:1", "state:p-3"]


def test_nested_batches_are_one_batch(store: Store) -> None:
    with store.batch(), store.batch():
        _insert(store, _record())
    assert store.get("p-1") == _record()


# --- transitions -------------------------------------------------------------------------------------


def test_transitions_are_kept_per_project_in_order(store: Store) -> None:
    log = [
        Transition("p-1", None, Stage.PREPARATION, "create", "req:r-1", 1.0),
        Transition("p-1", Stage.PREPARATION, Stage.START, "prepared", None, 2.0),
        Transition("p-2", None, Stage.PREPARATION, "create", "req:r-2", 2.5),
        Transition("p-1", Stage.START, Stage.BUILDER, "started", None, 3.0),
    ]
    for t in log:
        with store.unit() as unit:
            unit.log_transition(t)
    assert store.transitions("p-1") == [log[0], log[1], log[3]]
    assert store.transitions("p-2") == [log[2]]
    assert store.transitions("p-3") == []


# --- outbox ------------------------------------------------------------------------------------------


def test_enqueue_returns_numbered_items_in_order(store: Store) -> None:
    with store.unit() as unit:
        first = unit.enqueue([_item("a"), _item("b")])
    with store.unit() as unit:
        second = unit.enqueue([_item("c", b"payload", "flops/v1/x", retain=True)])
    numbered = first + second
    assert [i.key for i in numbered] == ["a", "b", "c"]
    seqs = [i.seq for i in numbered]
    assert all(s > 0 for s in seqs) and seqs == sorted(set(seqs))
    assert store.outbox() == numbered
    assert store.outbox()[2] == OutboxItem("c", "flops/v1/x", b"payload", True, seqs[2])
    assert store.outbox(limit=2) == first


def test_newer_item_with_the_same_key_replaces_the_older(store: Store) -> None:
    with store.unit() as unit:
        (old,) = unit.enqueue([_item("state:p-1", b"v1", retain=True)])
        unit.enqueue([_item("ev:p-1:1")])
    with store.unit() as unit:
        (new,) = unit.enqueue([_item("state:p-1", b"v2", retain=True)])
    # One state message, the newest, ordered where it was last enqueued.
    assert [(i.key, i.payload) for i in store.outbox()] == [("ev:p-1:1", b"x"), ("state:p-1", b"v2")]
    assert new.seq > old.seq
    # The broker acknowledged the old version: that must not drop the new one.
    store.sent([old])
    assert [(i.key, i.payload) for i in store.outbox()] == [("ev:p-1:1", b"x"), ("state:p-1", b"v2")]
    store.sent([new])
    assert [i.key for i in store.outbox()] == ["ev:p-1:1"]


def test_sent_forgets_acknowledged_items_only(store: Store) -> None:
    with store.unit() as unit:
        items = unit.enqueue([_item("a"), _item("b"), _item("c")])
    store.sent([items[0], items[2]])
    assert store.outbox() == [items[1]]
    store.sent([])
    store.sent([items[0]])  # acknowledged twice: harmless
    assert store.outbox() == [items[1]]


def test_sent_inside_a_batch(store: Store) -> None:
    with store.unit() as unit:
        items = unit.enqueue([_item("a"), _item("b")])
    with store.batch():
        store.sent([items[0]])
        with store.unit() as unit:
            unit.enqueue([_item("c")])
    assert [i.key for i in store.outbox()] == ["b", "c"]


# --- artifacts and seen ids ----------------------------------------------------------------------------


def test_artifacts_put_and_get(store: Store) -> None:
    with store.unit() as unit:
        assert unit.get_artifact("k") is None
        unit.put_artifact("k", {"ref": "env://1", "details": {"n": 1}})
    with store.unit() as unit:
        assert unit.get_artifact("k") == {"ref": "env://1", "details": {"n": 1}}
        unit.put_artifact("k", {"ref": "env://2"})
    with store.unit() as unit:
        assert unit.get_artifact("k") == {"ref": "env://2"}


def test_seen_records_the_result(store: Store) -> None:
    with store.unit() as unit:
        unit.mark_seen("e-1", "p-1", "reject")
        unit.mark_seen("req:r-1", "p-1", "p-1")
        unit.mark_seen("e-2", None)
    with store.unit() as unit:
        assert unit.seen("e-1") == "reject"
        assert unit.seen("req:r-1") == "p-1"
        assert unit.seen("e-2") == ""
        assert unit.seen("e-3") is None


# --- retention -----------------------------------------------------------------------------------------


def _finished(pid: str, at: float, **changes: object) -> ProjectRecord:
    fields: dict[str, object] = {
        "outcome": Outcome.COMPLETED,
        "stage_entered_at": at,
        "timestamps": {"preparation_at": 10.0, "finished_at": at},
        "deadline_at": None,
    }
    return _record(pid, Stage.FINISHED, **{**fields, **changes})


def _with_history(store: Store, record: ProjectRecord) -> None:
    with store.unit() as unit:
        unit.insert(record)
        unit.mark_seen(f"e-{record.project_id}", record.project_id, "accept")
        unit.mark_seen(f"req:{record.project_id}", record.project_id, record.project_id)
        unit.log_transition(Transition(record.project_id, None, Stage.PREPARATION, "create", None, 1.0))


def _has_history(store: Store, pid: str) -> bool:
    with store.unit() as unit:
        seen = unit.seen(f"e-{pid}") is not None
    return store.get(pid) is not None and bool(store.transitions(pid)) and seen


def test_prune_forgets_projects_finished_before_the_cutoff_with_their_history(store: Store) -> None:
    _with_history(store, _finished("p-old", 100.0))
    _with_history(store, _finished("p-older", 50.0))
    _with_history(store, _finished("p-recent", 300.0))
    _with_history(store, _record("p-running", Stage.LEARNERS, created_at=1.0, stage_entered_at=1.0))
    with store.unit() as unit:
        unit.mark_seen("e-anonymous", None, "reject")

    assert _ids(store.prune(200.0)) == ["p-older", "p-old"]  # oldest first

    for pid in ("p-old", "p-older"):
        _nothing_of(store, pid)
        with store.unit() as unit:
            assert unit.seen(f"req:{pid}") is None
    assert _has_history(store, "p-recent") and _has_history(store, "p-running")
    with store.unit() as unit:
        assert unit.seen("e-anonymous") == "reject"
    assert _ids(store.prune(200.0)) == []


def test_prune_never_touches_unfinished_projects(store: Store) -> None:
    for stage in (Stage.PREPARATION, Stage.BUILDER, Stage.POST_TRAINING):
        _with_history(store, _record(f"p-{stage.value}", stage, created_at=0.0, stage_entered_at=0.0))
    assert _ids(store.prune(1e12)) == []
    assert len(store.unfinished()) == 3


def test_prune_counts_from_the_finish_stamp_or_else_the_stage_entry(store: Store) -> None:
    _insert(store, _finished("p-stamped", 100.0, stage_entered_at=500.0))
    _insert(store, _finished("p-unstamped", 0.0, timestamps={}, stage_entered_at=150.0))
    assert _ids(store.prune(120.0)) == ["p-stamped"]
    assert _ids(store.prune(160.0)) == ["p-unstamped"]


def test_prune_keeps_a_project_whose_model_is_still_served(store: Store) -> None:
    """Else nobody could stop its inference server any more (cancel of a completed project)."""
    served = _finished("p-served", 100.0, ctx={"model_url": "http://127.0.0.1:9/"})
    _insert(store, served)
    assert _ids(store.prune(200.0)) == []
    with store.unit() as unit:
        unit.update(dataclasses.replace(served, ctx={}), Stage.FINISHED)
    assert _ids(store.prune(200.0)) == ["p-served"]


def test_prune_takes_at_most_limit_oldest_first(store: Store) -> None:
    for i in range(5):
        _insert(store, _finished(f"p-{i}", 100.0 + i))
    assert _ids(store.prune(1000.0, limit=2)) == ["p-0", "p-1"]
    assert _ids(store.prune(1000.0, limit=2)) == ["p-2", "p-3"]
    assert _ids(store.prune(1000.0, limit=2)) == ["p-4"]


def test_a_project_finished_by_an_update_is_prunable(store: Store) -> None:
    _insert(store, _record())
    with store.unit() as unit:
        unit.update(_finished("p-1", 100.0), Stage.PREPARATION)
    assert _ids(store.prune(100.0)) == []
    assert _ids(store.prune(100.5)) == ["p-1"]


def test_prune_in_a_failed_batch_is_undone(store: Store) -> None:
    _with_history(store, _finished("p-old", 100.0))
    with pytest.raises(RuntimeError), store.batch():
        with store.unit() as unit:
            unit.log_transition(Transition("p-new", None, Stage.PREPARATION, "create", None, 2.0))
            unit.mark_seen("e-p-old-late", "p-old", "ignore")
        assert _ids(store.prune(200.0)) == ["p-old"]
        raise RuntimeError("crash before commit")
    assert _has_history(store, "p-old")
    assert len(store.transitions("p-old")) == 1 and store.transitions("p-new") == []
    with store.unit() as unit:
        assert unit.seen("e-p-old-late") is None


def test_prune_artifacts_forgets_those_unused_since_the_cutoff(store: Store, clock: _Clock) -> None:
    with store.unit() as unit:
        unit.put_artifact("built-long-ago", {"ref": "env://1"})
        unit.put_artifact("used-lately", {"ref": "env://2"})
    clock.now += 30 * 86400
    with store.unit() as unit:
        unit.put_artifact("built-lately", {"ref": "env://3"})
    clock.now += 1
    with store.unit() as unit:
        assert unit.get_artifact("used-lately") == {"ref": "env://2"}
        assert unit.get_artifact("never-built") is None
    assert store.prune_artifacts(clock.now - 86400) == ["built-long-ago"]
    with store.unit() as unit:
        assert unit.get_artifact("built-long-ago") is None
        assert unit.get_artifact("used-lately") == {"ref": "env://2"}
        assert unit.get_artifact("built-lately") == {"ref": "env://3"}
    assert store.prune_artifacts(clock.now + 1, limit=1) == ["built-lately"]


# --- adapters ------------------------------------------------------------------------------------------


def test_sqlite_data_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "durable.sqlite3"
    store = SQLiteStore(path)
    with store.unit() as unit:
        _write_everything(unit)
    with store.unit() as unit:
        (before,) = unit.enqueue([_item("later")])
    store.close()

    reopened = SQLiteStore(path)
    try:
        assert reopened.get("p-1") == _record()
        assert [r.project_id for r in reopened.unfinished()] == ["p-1"]
        assert reopened.transitions("p-1") == [Transition("p-1", None, Stage.PREPARATION, "create", "e-p-1", 1.0)]
        assert [i.key for i in reopened.outbox()] == ["ev:p-1:1", "state:p-1", "later"]
        with reopened.unit() as unit:
            assert unit.seen("e-p-1") == "accept"
            assert unit.get_artifact("art-p-1") == {"ref": "env://x"}
            (after,) = unit.enqueue([_item("newest")])
        # Numbering continues after a restart, so an old acknowledgement can never delete a new item.
        assert after.seq > before.seq
        assert [i.key for i in reopened.outbox()][-1] == "newest"
    finally:
        reopened.close()


def test_sqlite_uncommitted_unit_is_not_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite3"
    store = SQLiteStore(path)
    with pytest.raises(RuntimeError), store.batch():
        with store.unit() as unit:
            _write_everything(unit)
        raise RuntimeError("crash before commit")
    store.close()
    reopened = SQLiteStore(path)
    try:
        _nothing_of(reopened, "p-1")
    finally:
        reopened.close()


# The schema a file written by the first release has (no finish time, no artifact use time).
_FIRST_SCHEMA = """
CREATE TABLE projects (project_id TEXT PRIMARY KEY, stage TEXT NOT NULL, sla TEXT NOT NULL,
    created_at REAL NOT NULL, stage_entered_at REAL NOT NULL, deadline_at REAL, outcome TEXT, reason TEXT,
    failed_stage TEXT, ctx TEXT NOT NULL, timestamps TEXT NOT NULL, seq INTEGER NOT NULL, request_id TEXT);
CREATE TABLE artifacts (key TEXT PRIMARY KEY, artifact TEXT NOT NULL);
INSERT INTO projects VALUES ('p-done', 'finished', '{}', 1, 100, NULL, 'completed', 'completed', NULL, '{}',
    '{"finished_at": 100}', 1, NULL);
INSERT INTO projects VALUES ('p-run', 'builder', '{}', 1, 1, 9, NULL, NULL, NULL, '{}', '{}', 1, NULL);
INSERT INTO artifacts VALUES ('k', '{"ref": "env://x"}');
"""


def test_sqlite_file_of_the_first_release_gains_the_retention_columns(tmp_path: Path, clock: _Clock) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(_FIRST_SCHEMA)
    store = SQLiteStore(path, clock=clock)
    try:
        assert _ids(store.prune(50.0)) == []
        assert _ids(store.prune(150.0)) == ["p-done"]
        assert [r.project_id for r in store.unfinished()] == ["p-run"]
        # Cached before the upgrade: counted as used at the upgrade, so kept a whole retention period.
        assert store.prune_artifacts(clock.now) == []
        assert store.prune_artifacts(clock.now + 1) == ["k"]
    finally:
        store.close()
    SQLiteStore(path).close()  # opening it again changes nothing


def test_sqlite_prune_reads_indexes_not_every_row(tmp_path: Path) -> None:
    from flops.store_sqlite import PRUNABLE, UNUSED_ARTIFACTS

    store = SQLiteStore(tmp_path / "plan.sqlite3")
    try:
        db = store._db

        def plan(sql: str, *args: object) -> str:
            return " | ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", args))

        assert "USING INDEX projects_finished" in plan(PRUNABLE, 1.0, 10)
        assert "USING INDEX artifacts_used" in plan(UNUSED_ARTIFACTS, 1.0, 10)
        assert "INDEX seen_project" in plan("DELETE FROM seen WHERE project_id = ?", "p-1")
        assert "INDEX transitions_project" in plan("DELETE FROM transitions WHERE project_id = ?", "p-1")
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "kind"), [("memory://", MemoryStore), ("{tmp}/x/manager.sqlite3", SQLiteStore)], ids=["memory", "sqlite"]
)
def test_open_store_picks_the_adapter(tmp_path: Path, url: str, kind: Callable[..., Store]) -> None:
    store = open_store(url.format(tmp=tmp_path))
    try:
        assert isinstance(store, kind)  # type: ignore[arg-type]
        _insert(store, _record())
        assert store.get("p-1") == _record()
    finally:
        store.close()


def test_an_exception_escaping_the_batch_discards_all_of_it(store: Store) -> None:
    """The manager relies on this: when a batch fails, none of its messages is acknowledged to the broker,
    so none of their effects (seen ids, outbox, acknowledged deletions) may stay either."""
    with store.unit() as unit:
        _write_everything(unit, "p-0")
    (acked,) = [i for i in store.outbox() if i.key == "ev:p-0:1"]
    with pytest.raises(OSError, match="disk full"), store.batch():
        store.sent([acked])
        with store.unit() as unit:
            _write_everything(unit, "p-1")
            unit.update(_record("p-0", Stage.BUILDER), Stage.PREPARATION)
            unit.mark_seen("e-p-0", "p-0", "overwritten")
        raise OSError("disk full")
    _nothing_of(store, "p-1")
    assert store.get("p-0") == _record("p-0")
    assert [i.key for i in store.outbox()] == ["ev:p-0:1", "state:p-0"]
    with store.unit() as unit:
        assert unit.seen("e-p-0") == "accept"
    assert len(store.transitions("p-0")) == 1
    # And the store goes on working.
    with store.unit() as unit:
        _write_everything(unit, "p-1")
    assert store.get("p-1") == _record("p-1")


def _ids(pruned: list[PrunedProject]) -> list[str]:
    return [p.project_id for p in pruned]
