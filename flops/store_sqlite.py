"""SQLite (WAL) adapter of the store port: the manager's durable state in one file."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flops.errors import StaleWrite, StoreError
from flops.lifecycle_stages import Outcome, Stage
from flops.store import ARTIFACT_TOUCH_S, OutboxItem, ProjectRecord, PrunedProject, Transition

SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    project_id TEXT PRIMARY KEY,
    stage TEXT NOT NULL,
    sla TEXT NOT NULL,
    created_at REAL NOT NULL,
    stage_entered_at REAL NOT NULL,
    deadline_at REAL,
    outcome TEXT,
    reason TEXT,
    failed_stage TEXT,
    ctx TEXT NOT NULL,
    timestamps TEXT NOT NULL,
    seq INTEGER NOT NULL,
    request_id TEXT,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS projects_unfinished ON projects(stage) WHERE stage != 'finished';
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    project_id TEXT NOT NULL,
    source TEXT,
    dest TEXT NOT NULL,
    trigger TEXT NOT NULL,
    event_id TEXT,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS transitions_project ON transitions(project_id);
CREATE TABLE IF NOT EXISTS seen (
    message_id TEXT PRIMARY KEY,
    project_id TEXT,
    result TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_project ON seen(project_id) WHERE project_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS outbox (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_order ON outbox(n);
CREATE TABLE IF NOT EXISTS artifacts (
    key TEXT PRIMARY KEY,
    artifact TEXT NOT NULL,
    used_at REAL
);
"""

# Columns added after the first release: (table, column, how existing rows are filled). The indexes on them
# are created after the columns exist (an older file gets the column first).
_ADDED = (
    (
        "projects",
        "finished_at",
        "UPDATE projects SET finished_at = COALESCE(json_extract(timestamps, '$.finished_at'), stage_entered_at) "
        "WHERE stage = 'finished'",
    ),
    ("artifacts", "used_at", "UPDATE artifacts SET used_at = :now"),
)
_INDEXES = """
CREATE INDEX IF NOT EXISTS projects_finished ON projects(finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS artifacts_used ON artifacts(used_at);
"""

# Prunable projects, oldest first, through projects_finished (never a scan of every project).
PRUNABLE = (
    "SELECT project_id, json_extract(sla, '$.customerID') FROM projects "
    "WHERE finished_at IS NOT NULL AND finished_at < ? "
    "AND json_extract(ctx, '$.model_url') IS NULL ORDER BY finished_at LIMIT ?"
)
UNUSED_ARTIFACTS = "SELECT key FROM artifacts WHERE used_at < ? ORDER BY used_at LIMIT ?"

_COLUMNS = (
    "project_id, stage, sla, created_at, stage_entered_at, deadline_at, outcome, reason, failed_stage, "
    "ctx, timestamps, seq, request_id"
)


_CHANGING = (
    "stage=?, stage_entered_at=?, deadline_at=?, outcome=?, reason=?, failed_stage=?, ctx=?, timestamps=?, seq=?, "
    "finished_at=?"
)


def _row_to_record(row: tuple[Any, ...]) -> ProjectRecord:
    return ProjectRecord(
        project_id=row[0],
        stage=Stage(row[1]),
        sla=json.loads(row[2]),
        created_at=row[3],
        stage_entered_at=row[4],
        deadline_at=row[5],
        outcome=Outcome(row[6]) if row[6] else None,
        reason=row[7],
        failed_stage=Stage(row[8]) if row[8] else None,
        ctx=json.loads(row[9]),
        timestamps=json.loads(row[10]),
        seq=row[11],
        request_id=row[12],
    )


def _changing_values(r: ProjectRecord) -> tuple[Any, ...]:
    """The columns an event may change, in the order of ``_CHANGING``."""
    return (
        r.stage.value,
        r.stage_entered_at,
        r.deadline_at,
        r.outcome.value if r.outcome else None,
        r.reason,
        r.failed_stage.value if r.failed_stage else None,
        json.dumps(r.ctx),
        json.dumps(r.timestamps),
        r.seq,
        r.finished_at,
    )


def _record_values(r: ProjectRecord) -> tuple[Any, ...]:
    """Every column, in the order of ``_COLUMNS`` and then ``finished_at``."""
    *changing, finished_at = _changing_values(r)
    stage, *rest = changing
    return (r.project_id, stage, json.dumps(r.sla), r.created_at, *rest, r.request_id, finished_at)


class _SQLiteUnit:
    def __init__(self, store: SQLiteStore) -> None:
        self._db = store._db
        self._store = store

    def seen(self, message_id: str) -> str | None:
        row = self._db.execute("SELECT result FROM seen WHERE message_id = ?", (message_id,)).fetchone()
        return None if row is None else row[0]

    def mark_seen(self, message_id: str, project_id: str | None, result: str = "") -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO seen(message_id, project_id, result) VALUES (?, ?, ?)",
            (message_id, project_id, result),
        )

    def get(self, project_id: str) -> ProjectRecord | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM projects WHERE project_id = ?", (project_id,)).fetchone()
        return None if row is None else _row_to_record(row)

    def insert(self, record: ProjectRecord) -> None:
        try:
            self._db.execute(
                f"INSERT INTO projects({_COLUMNS}, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                _record_values(record),
            )
        except sqlite3.IntegrityError:
            raise StaleWrite(record.project_id, "(new)", "exists") from None

    def update(self, record: ProjectRecord, expected_stage: Stage) -> None:
        # sla, created_at and request_id are fixed at insert: not re-encoding the SLA on every event saves
        # a json.dumps of the largest field per handled message.
        cur = self._db.execute(
            f"UPDATE projects SET {_CHANGING} WHERE project_id=? AND stage=?",
            (*_changing_values(record), record.project_id, expected_stage.value),
        )
        if cur.rowcount != 1:
            row = self._db.execute("SELECT stage FROM projects WHERE project_id = ?", (record.project_id,)).fetchone()
            raise StaleWrite(record.project_id, expected_stage, row[0] if row else None)

    def log_transition(self, t: Transition) -> None:
        self._db.execute(
            "INSERT INTO transitions(project_id, source, dest, trigger, event_id, ts) VALUES (?,?,?,?,?,?)",
            (t.project_id, t.source.value if t.source else None, t.dest.value, t.trigger, t.event_id, t.ts),
        )

    def enqueue(self, items: list[OutboxItem]) -> list[OutboxItem]:
        numbered = [dataclasses.replace(item, seq=self._store._next_n()) for item in items]
        rows = [(i.key, i.seq, i.topic, i.payload, int(i.retain)) for i in numbered]
        self._db.executemany(
            "INSERT INTO outbox(key, n, topic, payload, retain) VALUES (?,?,?,?,?) "
            "ON CONFLICT(key) DO UPDATE SET n=excluded.n, topic=excluded.topic, payload=excluded.payload, "
            "retain=excluded.retain",
            rows,
        )
        return numbered

    def get_artifact(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT artifact, used_at FROM artifacts WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        now = self._store._clock()
        if row[1] is None or row[1] < now - ARTIFACT_TOUCH_S:
            self._db.execute("UPDATE artifacts SET used_at = ? WHERE key = ?", (now, key))
        return json.loads(row[0])

    def put_artifact(self, key: str, artifact: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO artifacts(key, artifact, used_at) VALUES (?, ?, ?)",
            (key, json.dumps(artifact), self._store._clock()),
        )


class SQLiteStore:
    """One connection, WAL journal; every public call takes the lock (paho's thread never calls in)."""

    def __init__(self, path: str | Path, synchronous: str = "FULL", *, clock: Callable[[], float] = time.time) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'FULL' else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._clock = clock
        self._migrate()
        self._lock = threading.RLock()
        self._in_batch = False
        self._n = self._db.execute("SELECT COALESCE(MAX(n), 0) FROM outbox").fetchone()[0]

    def _migrate(self) -> None:
        """Add the columns a file written by an older version lacks (filled from what it holds), then the
        indexes on them."""
        self._db.execute("BEGIN IMMEDIATE")  # another process opening the same file waits, then finds them
        try:
            for table, column, fill in _ADDED:
                if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} REAL")
                    self._db.execute(fill, {"now": self._clock()} if ":now" in fill else {})
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._db.executescript(_INDEXES)

    def _next_n(self) -> int:
        self._n += 1
        return self._n

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock:
            if self._in_batch:
                yield
                return
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreError(str(exc)) from exc
            self._in_batch = True
            try:
                yield
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise
            else:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.OperationalError as exc:
                    with contextlib.suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                    raise StoreError(str(exc)) from exc
            finally:
                self._in_batch = False

    @contextlib.contextmanager
    def unit(self) -> Iterator[_SQLiteUnit]:
        with self._lock:
            if not self._in_batch:
                with self.batch(), self.unit() as unit:
                    yield unit
                return
            # One name for every savepoint: SQLite resolves ROLLBACK TO / RELEASE to the innermost one of
            # that name, and a constant statement text stays in sqlite3's statement cache.
            name = "u"
            self._db.execute(f"SAVEPOINT {name}")
            try:
                yield _SQLiteUnit(self)
            except BaseException:
                self._db.execute(f"ROLLBACK TO {name}")
                self._db.execute(f"RELEASE {name}")
                raise
            else:
                self._db.execute(f"RELEASE {name}")

    def get(self, project_id: str) -> ProjectRecord | None:
        with self._lock:
            return _SQLiteUnit(self).get(project_id)

    def unfinished(self) -> list[ProjectRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM projects WHERE stage != 'finished'").fetchall()
        return [_row_to_record(r) for r in rows]

    def projects(self, limit: int = 1000) -> list[ProjectRecord]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM projects ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [_row_to_record(r) for r in rows]

    def transitions(self, project_id: str) -> list[Transition]:
        with self._lock:
            rows = self._db.execute(
                "SELECT project_id, source, dest, trigger, event_id, ts FROM transitions "
                "WHERE project_id = ? ORDER BY id",
                (project_id,),
            ).fetchall()
        return [Transition(r[0], Stage(r[1]) if r[1] else None, Stage(r[2]), r[3], r[4], r[5]) for r in rows]

    def outbox(self, limit: int = 10_000) -> list[OutboxItem]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, topic, payload, retain, n FROM outbox ORDER BY n LIMIT ?", (limit,)
            ).fetchall()
        return [OutboxItem(r[0], r[1], bytes(r[2]), bool(r[3]), r[4]) for r in rows]

    def sent(self, items: list[OutboxItem]) -> None:
        if not items:
            return
        with self._lock:
            if self._in_batch:
                self._delete_sent(items)
                return
            with self.batch():
                self._delete_sent(items)

    def _delete_sent(self, items: list[OutboxItem]) -> None:
        self._db.executemany("DELETE FROM outbox WHERE key = ? AND n = ?", [(item.key, item.seq) for item in items])

    def prune(self, finished_before: float, *, limit: int = 1000) -> list[PrunedProject]:
        with self._lock, self.batch():
            rows = self._db.execute(PRUNABLE, (finished_before, limit)).fetchall()
            pruned = [PrunedProject(r[0], str(r[1] or "")) for r in rows]
            ids = [(p.project_id,) for p in pruned]
            self._db.executemany("DELETE FROM transitions WHERE project_id = ?", ids)
            self._db.executemany("DELETE FROM seen WHERE project_id = ?", ids)
            self._db.executemany("DELETE FROM projects WHERE project_id = ?", ids)
        return pruned

    def prune_artifacts(self, unused_before: float, *, limit: int = 1000) -> list[str]:
        with self._lock, self.batch():
            keys = [r[0] for r in self._db.execute(UNUSED_ARTIFACTS, (unused_before, limit))]
            self._db.executemany("DELETE FROM artifacts WHERE key = ?", [(k,) for k in keys])
        return keys

    def close(self) -> None:
        with self._lock:
            self._db.close()
