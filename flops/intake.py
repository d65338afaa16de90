"""The manager's fair intake: what the bus received, sorted by class so a flood of one cannot starve another.

The bus hands every message to one FIFO queue. Taken straight from it, 20,000 agent statuses published
ahead of a project request delay its reply until all of them are handled. The intake drains that queue
into classes (the manager's own events, client requests and cancels, worker reports and receipts, agent
statuses) and picks each batch round-robin from them, so a request waits at most one batch whatever
else is queued. Inside a batch the manager's own events come first, then agent statuses, then the rest in
arrival order (a report must never overtake the agent status it relies on). Agent statuses are retained
messages where only the latest per topic matters: a newer one on the same topic replaces the queued one,
which is acknowledged at once (its successor stands for it).
"""

from __future__ import annotations

import collections
import queue
from collections.abc import Callable
from typing import Any

from flops import topics
from flops.bus import Inbound

CLIENT = "client"
WORKER = "worker"
STATUS = "status"
INTERNAL = "internal"
ORDER = (INTERNAL, CLIENT, WORKER, STATUS)
_KIND_CLASS = {
    "requests": CLIENT,
    "cancel": CLIENT,
    "agent_reports": WORKER,
    "agent_receipts": WORKER,
    "agent_status": STATUS,
}
# How many queued messages one drain moves out of the bus queue (bounds one iteration's work).
DRAIN_MAX = 100_000


class FairIntake:
    def __init__(self, source: queue.Queue[Any], ack: Callable[[Inbound], None]) -> None:
        self._source = source
        self._ack = ack
        # Every queued item with its arrival number, so a batch can be put back in arrival order.
        self._queues: dict[str, collections.deque[tuple[int, Any]]] = {
            c: collections.deque() for c in (INTERNAL, CLIENT, WORKER)
        }
        # Latest status per topic, numbered (and ordered) by the arrival of the topic's first queued status.
        self._statuses: collections.OrderedDict[str, tuple[int, Inbound]] = collections.OrderedDict()
        self._arrivals = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values()) + len(self._statuses)

    def take(self, timeout: float, max_items: int) -> list[Any]:
        """Up to ``max_items`` messages, shared fairly between the classes; waits up to ``timeout`` for one."""
        if not len(self):
            try:
                self._put(self._source.get(timeout=timeout))
            except queue.Empty:
                return []
        for _ in range(DRAIN_MAX):
            try:
                self._put(self._source.get_nowait())
            except queue.Empty:
                break
        batch: list[tuple[int, Any]] = []
        while len(batch) < max_items and len(self):
            # One round: a fair share for every class that has something queued.
            waiting = [c for c in ORDER if self._count(c)]
            share = max(1, (max_items - len(batch)) // len(waiting))
            for cls in waiting:
                for _ in range(min(share, max_items - len(batch))):
                    item = self._pop(cls)
                    if item is None:
                        break
                    batch.append(item)
        # The manager's own events first, then agent statuses, then the rest in arrival order: after a restart
        # the retained statuses arrive just after the reports queued in our session, and a report must meet
        # the agents it concerns (a stage counting online learners would otherwise find none).
        batch.sort(key=lambda numbered: (self._rank(numbered[1]), numbered[0]))
        return [item for _, item in batch]

    def _rank(self, item: Any) -> int:
        if not isinstance(item, Inbound):
            return 0
        return 1 if _KIND_CLASS.get(topics.parse(item.topic).kind) == STATUS else 2

    def _put(self, item: Any) -> None:
        self._arrivals += 1
        if not isinstance(item, Inbound):
            self._queues[INTERNAL].append((self._arrivals, item))
            return
        cls = _KIND_CLASS.get(topics.parse(item.topic).kind, CLIENT)
        if cls != STATUS:
            self._queues[cls].append((self._arrivals, item))
            return
        queued = self._statuses.get(item.topic)
        if queued is not None:
            self._ack(queued[1])
        self._statuses[item.topic] = (queued[0] if queued is not None else self._arrivals, item)

    def _count(self, cls: str) -> int:
        return len(self._statuses) if cls == STATUS else len(self._queues[cls])

    def _pop(self, cls: str) -> tuple[int, Any] | None:
        if cls == STATUS:
            return self._statuses.popitem(last=False)[1] if self._statuses else None
        q = self._queues[cls]
        return q.popleft() if q else None
