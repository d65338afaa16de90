"""The manager's store: one port (:class:`Store`), two adapters (SQLite and in-memory), one contract.

Holds projects (stage as a name, never a pickle), the transition log, processed message ids, the artifact
cache and an outbox of messages to publish. A handled event is one :meth:`Store.unit` of work: the dedup
record, the new stage (compare-and-set on the stage it was read in) and the outgoing messages commit
together, so a crash can never leave half an event applied. Several units may share one durable commit
(:meth:`Store.batch`) without losing their individual atomicity.

Nothing grows without bound: :meth:`Store.prune` forgets finished projects (with their transitions and seen
ids) and :meth:`Store.prune_artifacts` cache entries nobody used, both by an indexed timestamp.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from flops.lifecycle_stages import Outcome, Stage

# An artifact's last use is written at most this often, so a cache lookup is rarely a write.
ARTIFACT_TOUCH_S = 3600.0


@dataclass
class ProjectRecord:
    """A project as persisted: plain data, JSON-able."""

    project_id: str
    stage: Stage
    sla: dict[str, Any]
    created_at: float
    stage_entered_at: float
    deadline_at: float | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    failed_stage: Stage | None = None
    ctx: dict[str, Any] = field(default_factory=dict)
    timestamps: dict[str, float] = field(default_factory=dict)
    seq: int = 0
    request_id: str | None = None

    @property
    def customer(self) -> str:
        """Whose project it is: its topics sit under this customer's prefix."""
        return str(self.sla.get("customerID", ""))

    @property
    def finished_at(self) -> float | None:
        """When the project finished (None while it runs): what retention counts from."""
        if self.stage is not Stage.FINISHED:
            return None
        return self.timestamps.get(f"{Stage.FINISHED.value}_at", self.stage_entered_at)


@dataclass(frozen=True)
class OutboxItem:
    """A message committed with the event that caused it and published after the commit.

    ``key`` deduplicates: a newer item with the same key (e.g. the retained state of one project)
    replaces an older one that was not sent yet.
    """

    key: str
    topic: str
    payload: bytes
    retain: bool = False
    seq: int = 0


class PrunedProject(NamedTuple):
    """A project retention deleted: its customer names the topics its retained state must be cleared on."""

    project_id: str
    customer: str


@dataclass(frozen=True)
class Transition:
    project_id: str
    source: Stage | None
    dest: Stage
    trigger: str
    event_id: str | None
    ts: float


class Unit(Protocol):
    """One event's worth of reads and writes; all or nothing."""

    def seen(self, message_id: str) -> str | None:
        """The result stored when ``message_id`` was handled, or None if it is new."""

    def mark_seen(self, message_id: str, project_id: str | None, result: str = "") -> None: ...

    def get(self, project_id: str) -> ProjectRecord | None: ...

    def insert(self, record: ProjectRecord) -> None: ...

    def update(self, record: ProjectRecord, expected_stage: Stage) -> None:
        """Write ``record`` if the stored stage is still ``expected_stage``; raise StaleWrite otherwise."""

    def log_transition(self, transition: Transition) -> None: ...

    def enqueue(self, items: list[OutboxItem]) -> list[OutboxItem]:
        """Add items; returns them numbered (``seq``) as :meth:`Store.sent` expects them back."""

    def get_artifact(self, key: str) -> dict[str, Any] | None:
        """The cached artifact; a hit counts as a use (recorded at most every ``ARTIFACT_TOUCH_S``)."""

    def put_artifact(self, key: str, artifact: dict[str, Any]) -> None: ...


class Store(Protocol):
    def batch(self) -> contextlib.AbstractContextManager[None]:
        """Group the units opened inside into one durable commit."""

    def unit(self) -> contextlib.AbstractContextManager[Unit]:
        """One atomic unit of work (a savepoint inside a batch, a transaction outside one)."""

    def get(self, project_id: str) -> ProjectRecord | None: ...

    def unfinished(self) -> list[ProjectRecord]: ...

    def projects(self, limit: int = 1000) -> list[ProjectRecord]: ...

    def transitions(self, project_id: str) -> list[Transition]: ...

    def outbox(self, limit: int = 10_000) -> list[OutboxItem]: ...

    def sent(self, items: list[OutboxItem]) -> None:
        """Forget outbox items the broker acknowledged (only if not replaced by a newer item meanwhile)."""

    def prune(self, finished_before: float, *, limit: int = 1000) -> list[PrunedProject]:
        """Delete up to ``limit`` projects finished before ``finished_before`` (oldest first), with their
        transitions and seen ids; returns their ids and customers. Unfinished projects, and finished ones whose model is
        still served (``ctx["model_url"]``, so it can still be stopped), are kept."""

    def prune_artifacts(self, unused_before: float, *, limit: int = 1000) -> list[str]:
        """Delete up to ``limit`` cached artifacts neither stored nor used since ``unused_before``; their keys."""

    def close(self) -> None: ...


def open_store(url: str) -> Store:
    """``memory://`` or a SQLite file path."""
    if url == "memory://":
        from flops.store_memory import MemoryStore

        return MemoryStore()
    from flops.store_sqlite import SQLiteStore

    return SQLiteStore(url)
