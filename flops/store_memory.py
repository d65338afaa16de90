"""In-memory adapter of the store port, for tests and benchmarks; same contract as SQLite."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from flops.errors import StaleWrite
from flops.lifecycle_stages import Stage
from flops.store import ARTIFACT_TOUCH_S, OutboxItem, ProjectRecord, PrunedProject, Transition


@dataclasses.dataclass(frozen=True)
class _Seen:
    result: str
    project_id: str | None


@dataclasses.dataclass(frozen=True)
class _Artifact:
    artifact: dict[str, Any]
    used_at: float


class _State:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.projects: dict[str, ProjectRecord] = {}
        self.seen: dict[str, _Seen] = {}
        self.transitions: list[Transition] = []
        self.outbox: dict[str, OutboxItem] = {}
        self.artifacts: dict[str, _Artifact] = {}
        self.counter = 0
        # While an outermost batch runs: what it needs to undo itself if it fails (as SQLite's ROLLBACK does).
        self.journal: _Journal | None = None


_MISSING = object()


@dataclasses.dataclass
class _Journal:
    projects: dict[str, ProjectRecord]
    outbox: dict[str, OutboxItem]
    artifacts: dict[str, _Artifact]
    transitions: int
    seen: dict[str, object] = dataclasses.field(default_factory=dict)  # previous value per id written
    # The transition log as it was before the batch's first prune (which rewrites the list).
    before_prune: list[Transition] | None = None

    @classmethod
    def of(cls, state: _State) -> _Journal:
        # Records are replaced, never mutated, in the shared state: shallow copies are enough.
        return cls(dict(state.projects), dict(state.outbox), dict(state.artifacts), len(state.transitions))

    def undo(self, state: _State) -> None:
        state.projects, state.outbox, state.artifacts = self.projects, self.outbox, self.artifacts
        if self.before_prune is not None:
            state.transitions = self.before_prune
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
        self.seen_ids: dict[str, _Seen] = {}
        self.transitions: list[Transition] = []
        self.outbox: list[OutboxItem] = []
        self.artifacts: dict[str, _Artifact] = {}

    def seen(self, message_id: str) -> str | None:
        found = self.seen_ids.get(message_id) or self._state.seen.get(message_id)
        return None if found is None else found.result

    def mark_seen(self, message_id: str, project_id: str | None, result: str = "") -> None:
        self.seen_ids[message_id] = _Seen(result, project_id)

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
        found = self.artifacts.get(key) or self._state.artifacts.get(key)
        if found is None:
            return None
        now = self._state.clock()
        if found.used_at < now - ARTIFACT_TOUCH_S:
            self.artifacts[key] = _Artifact(found.artifact, now)
        return found.artifact

    def put_artifact(self, key: str, artifact: dict[str, Any]) -> None:
        self.artifacts[key] = _Artifact(artifact, self._state.clock())

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
    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._state = _State(clock)
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

    def prune(self, finished_before: float, *, limit: int = 1000) -> list[PrunedProject]:
        # Scans: this adapter is for tests and benchmarks; the SQLite one reads an index.
        with self._lock, self.batch():
            state = self._state
            old = sorted(
                (p.finished_at, pid)
                for pid, p in state.projects.items()
                if p.finished_at is not None and p.finished_at < finished_before and not p.ctx.get("model_url")
            )
            ids = [pid for _, pid in old[:limit]]
            gone = set(ids)
            if not gone:
                return []
            journal = state.journal
            assert journal is not None
            if journal.before_prune is None:
                journal.before_prune = state.transitions
            state.transitions = [t for t in state.transitions if t.project_id not in gone]
            for message_id, seen in list(state.seen.items()):
                if seen.project_id in gone:
                    journal.seen.setdefault(message_id, seen)
                    del state.seen[message_id]
            pruned = [PrunedProject(pid, str(state.projects[pid].sla.get("customerID", ""))) for pid in ids]
            for pid in ids:
                del state.projects[pid]
        return pruned

    def prune_artifacts(self, unused_before: float, *, limit: int = 1000) -> list[str]:
        with self._lock, self.batch():
            old = sorted((a.used_at, key) for key, a in self._state.artifacts.items() if a.used_at < unused_before)
            keys = [key for _, key in old[:limit]]
            for key in keys:
                del self._state.artifacts[key]
        return keys

    def close(self) -> None:
        return None
