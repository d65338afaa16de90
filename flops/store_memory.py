"""In-memory adapter of the store port, for tests and benchmarks; same contract as SQLite."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

from flops.errors import StaleWrite
from flops.lifecycle_stages import Stage
from flops.store import OutboxItem, ProjectRecord, Transition


class _State:
    def __init__(self) -> None:
        self.projects: dict[str, ProjectRecord] = {}
        self.seen: dict[str, str] = {}
        self.transitions: list[Transition] = []
        self.outbox: dict[str, OutboxItem] = {}
        self.artifacts: dict[str, dict[str, Any]] = {}
        self.counter = 0
        # While an outermost batch runs: what it needs to undo itself if it fails (as SQLite's ROLLBACK does).
        self.journal: _Journal | None = None


_MISSING = object()


@dataclasses.dataclass
class _Journal:
    projects: dict[str, ProjectRecord]
    outbox: dict[str, OutboxItem]
    artifacts: dict[str, dict[str, Any]]
    transitions: int
    seen: dict[str, object] = dataclasses.field(default_factory=dict)  # previous value per id written

    @classmethod
    def of(cls, state: _State) -> _Journal:
        # Records are replaced, never mutated, in the shared state: shallow copies are enough.
        return cls(dict(state.projects), dict(state.outbox), dict(state.artifacts), len(state.transitions))

    def undo(self, state: _State) -> None:
        state.projects, state.outbox, state.artifacts = self.projects, self.outbox, self.artifacts
        del state.transitions[self.transitions :]
        for message_id, previous in self.seen.items():
            if previous is _MISSING:
                state.seen.pop(message_id, None)
            else:
                state.seen[message_id] = previous  # type: ignore[assignment]


class _MemoryUnit:
    """Buffers writes; applied to the shared state only when the unit ends without an exception."""

    def __init__(self, state: _State) -> None:
        self._state = state
        self.projects: dict[str, ProjectRecord] = {}
        self.expected: dict[str, Stage] = {}
        self.seen_ids: dict[str, str] = {}
        self.transitions: list[Transition] = []
        self.outbox: list[OutboxItem] = []
        self.artifacts: dict[str, dict[str, Any]] = {}

    def seen(self, message_id: str) -> str | None:
        if message_id in self.seen_ids:
            return self.seen_ids[message_id]
        return self._state.seen.get(message_id)

    def mark_seen(self, message_id: str, project_id: str | None, result: str = "") -> None:
        self.seen_ids[message_id] = result

    def get(self, project_id: str) -> ProjectRecord | None:
        record = self.projects.get(project_id) or self._state.projects.get(project_id)
        return copy.deepcopy(record)

    def insert(self, record: ProjectRecord) -> None:
        if record.project_id in self._state.projects or record.project_id in self.projects:
            raise StaleWrite(record.project_id, "(new)", "exists")
        self.projects[record.project_id] = copy.deepcopy(record)

    def update(self, record: ProjectRecord, expected_stage: Stage) -> None:
        current = self.projects.get(record.project_id) or self._state.projects.get(record.project_id)
        if current is None or current.stage != expected_stage:
            raise StaleWrite(record.project_id, expected_stage, current.stage if current else None)
        self.projects[record.project_id] = copy.deepcopy(record)

    def log_transition(self, transition: Transition) -> None:
        self.transitions.append(transition)

    def enqueue(self, items: list[OutboxItem]) -> list[OutboxItem]:
        numbered = []
        for item in items:
            self._state.counter += 1
            numbered.append(dataclasses.replace(item, seq=self._state.counter))
        self.outbox.extend(numbered)
        return numbered

    def get_artifact(self, key: str) -> dict[str, Any] | None:
        return self.artifacts.get(key) or self._state.artifacts.get(key)

    def put_artifact(self, key: str, artifact: dict[str, Any]) -> None:
        self.artifacts[key] = artifact

    def apply(self) -> None:
        state = self._state
        if state.journal is not None:
            for message_id in self.seen_ids:
                state.journal.seen.setdefault(message_id, state.seen.get(message_id, _MISSING))
        state.projects.update(self.projects)
        state.seen.update(self.seen_ids)
        state.transitions.extend(self.transitions)
        for item in self.outbox:
            state.outbox.pop(item.key, None)  # re-insert so iteration order is enqueue order
            state.outbox[item.key] = item
        state.artifacts.update(self.artifacts)


class MemoryStore:
    def __init__(self) -> None:
        self._state = _State()
        self._lock = threading.RLock()

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        with self._lock:
            if self._state.journal is not None:
                yield
                return
            self._state.journal = _Journal.of(self._state)
            try:
                yield
            except BaseException:
                self._state.journal.undo(self._state)
                raise
            finally:
                self._state.journal = None

    @contextlib.contextmanager
    def unit(self) -> Iterator[_MemoryUnit]:
        with self._lock:
            unit = _MemoryUnit(self._state)
            yield unit
            unit.apply()

    def get(self, project_id: str) -> ProjectRecord | None:
        with self._lock:
            return copy.deepcopy(self._state.projects.get(project_id))

    def unfinished(self) -> list[ProjectRecord]:
        with self._lock:
            return [copy.deepcopy(p) for p in self._state.projects.values() if p.stage is not Stage.FINISHED]

    def projects(self, limit: int = 1000) -> list[ProjectRecord]:
        with self._lock:
            return [copy.deepcopy(p) for p in list(self._state.projects.values())[:limit]]

    def transitions(self, project_id: str) -> list[Transition]:
        with self._lock:
            return [t for t in self._state.transitions if t.project_id == project_id]

    def outbox(self, limit: int = 10_000) -> list[OutboxItem]:
        with self._lock:
            return list(self._state.outbox.values())[:limit]

    def sent(self, items: list[OutboxItem]) -> None:
        with self._lock:
            for item in items:
                if self._state.outbox.get(item.key) == item:
                    del self._state.outbox[item.key]

    def close(self) -> None:
        return None
