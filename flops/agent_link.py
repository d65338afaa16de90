"""The agent's durable report outbox: a report is kept until the manager says it committed it.

A report published while the manager is away is lost when nobody holds a session for it (a broker restarted
without persistence, an agent that reconnected before the manager re-subscribed). So every report goes into
this outbox (SQLite, one row per ``event_id``) before it is published, and leaves it only when the manager's
:class:`~flops.messages.ReportAck` names it. Until then the agent re-sends it: at once when the manager
announces itself (its retained ``online`` status follows its subscriptions), after every reconnect of the
agent, and every ``resend_s`` meanwhile. The manager deduplicates by ``event_id``, so a re-sent report has
no second effect. Bounded: at most ``max_rows`` reports, none older than ``ttl_s`` (dropped with a warning).
:class:`ReportChannel` is that cycle for whoever reports like an agent (the agent, the Oakestra adapter).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from flops.errors import PublishFailed
from flops.messages import ReportAck

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    event_id TEXT PRIMARY KEY,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    sent_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_sent ON reports(sent_at);
"""


@dataclass(frozen=True)
class Pending:
    event_id: str
    topic: str
    payload: bytes


class ReportOutbox:
    def __init__(
        self,
        path: Path,
        *,
        resend_s: float = 5.0,
        ttl_s: float = 7 * 24 * 3600.0,
        max_rows: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self.resend_s = resend_s
        self.ttl_s = ttl_s
        self.max_rows = max_rows
        self._clock = clock

    def add(self, event_id: str, topic: str, payload: bytes) -> None:
        """Record a report before it is published (a repeat of the same id keeps the first)."""
        now = self._clock()
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO reports(event_id, topic, payload, created_at, sent_at) VALUES (?,?,?,?,?)",
                (event_id, topic, payload, now, now),
            )

    def acked(self, event_ids: list[str]) -> None:
        with self._lock:
            self._db.executemany("DELETE FROM reports WHERE event_id = ?", [(e,) for e in event_ids])

    def due(self, *, everything: bool = False) -> list[Pending]:
        """Reports to publish again: all of them, or those not sent for ``resend_s``; marks them sent now."""
        now = self._clock()
        self._expire(now)
        cutoff = now if everything else now - self.resend_s
        with self._lock:
            rows = self._db.execute(
                "SELECT event_id, topic, payload FROM reports WHERE sent_at <= ? ORDER BY created_at", (cutoff,)
            ).fetchall()
            self._db.execute("UPDATE reports SET sent_at = ? WHERE sent_at <= ?", (now, cutoff))
        return [Pending(r[0], r[1], bytes(r[2])) for r in rows]

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM reports").fetchone()[0])

    def _expire(self, now: float) -> None:
        with self._lock:
            old = self._db.execute("DELETE FROM reports WHERE created_at < ?", (now - self.ttl_s,)).rowcount
            over = self._db.execute(
                "DELETE FROM reports WHERE event_id IN (SELECT event_id FROM reports ORDER BY created_at DESC "
                "LIMIT -1 OFFSET ?)",
                (self.max_rows,),
            ).rowcount
        if old or over:
            log.warning("reports never acknowledged by the manager were dropped", expired=old, over_limit=over)

    def close(self) -> None:
        with self._lock:
            self._db.close()


class ReportChannel:
    """Reports to the manager through an outbox: recorded, published, re-sent until acknowledged."""

    def __init__(self, outbox: ReportOutbox, publish: Callable[[str, bytes], object], logger: Any) -> None:
        self.outbox = outbox
        self._publish = publish
        self._log = logger

    def send(self, topic: str, event_id: str, payload: bytes) -> None:
        self.outbox.add(event_id, topic, payload)  # first: a publish that fails now is re-sent later
        with contextlib.suppress(PublishFailed):
            self._publish(topic, payload)

    def resend(self, *, everything: bool = False) -> None:
        pending = self.outbox.due(everything=everything)
        if pending:
            self._log.info("re-sending reports not yet acknowledged", count=len(pending))
        for report in pending:
            with contextlib.suppress(PublishFailed):
                self._publish(report.topic, report.payload)

    def on_ack(self, payload: bytes) -> None:
        """The manager's acknowledgement: forget what it committed; re-send everything when it asks."""
        try:
            ack = ReportAck.model_validate_json(payload)
        except ValueError as exc:
            self._log.warning("unreadable report acknowledgement", error=str(exc)[:300])
            return
        self.outbox.acked(ack.event_ids)
        if ack.resend:
            self.resend(everything=True)
