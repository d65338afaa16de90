"""Command delivery: a command stays in the manager's outbox until its agent says it recorded it.

A broker's PUBACK only says the broker took the command; an agent that was away (a broker restarted
without persistence, an agent that reconnected after the manager published) never sees it. So commands are
tracked here until the agent's receipt arrives on ``agents/{id}/receipts``: re-sent as soon as the agent
announces itself (its birth follows its subscriptions) and every ``resend_s`` meanwhile, and given up after
``ttl_s``. Agents recognise repeats by ``command_id`` and receipt them again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from flops import topics
from flops.store import OutboxItem

PREFIX = "cmd:"


@dataclass
class _Pending:
    item: OutboxItem
    agent_id: str
    first_sent: float
    last_sent: float
    refused: bool = False


class CommandDelivery:
    def __init__(self, resend_s: float, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.resend_s = resend_s
        self.ttl_s = ttl_s
        self._clock = clock
        self._pending: dict[str, _Pending] = {}

    def __len__(self) -> int:
        return len(self._pending)

    @staticmethod
    def is_command(item: OutboxItem) -> bool:
        return item.key.startswith(PREFIX)

    def sent(self, item: OutboxItem) -> None:
        """``item`` (a command) was just published."""
        now = self._clock()
        pending = self._pending.get(item.key)
        if pending is None:
            agent_id = topics.parse(item.topic).ident or ""
            self._pending[item.key] = _Pending(item, agent_id, now, now)
        else:
            pending.item, pending.last_sent = item, now

    def refused(self, item: OutboxItem) -> None:
        """The broker refused it (ACL): re-sending on a timer would only repeat the refusal."""
        pending = self._pending.get(item.key)
        if pending is not None:
            pending.refused = True

    def receipted(self, agent_id: str, command_ids: list[str]) -> list[OutboxItem]:
        """The agent recorded these commands; returns the outbox items to forget. A receipt from another agent
        than the command's is ignored."""
        done = []
        for command_id in command_ids:
            pending = self._pending.get(PREFIX + command_id)
            if pending is not None and pending.agent_id == agent_id:
                done.append(self._pending.pop(PREFIX + command_id).item)
        return done

    def for_agent(self, agent_id: str) -> list[OutboxItem]:
        """Everything not yet receipted by ``agent_id`` (it has just announced itself)."""
        return [p.item for p in self._pending.values() if p.agent_id == agent_id and not p.refused]

    def due(self) -> list[OutboxItem]:
        """Commands to re-send now: not receipted within ``resend_s`` of their last send."""
        now = self._clock()
        return [p.item for p in self._pending.values() if not p.refused and now - p.last_sent >= self.resend_s]

    def expired(self) -> list[OutboxItem]:
        """Commands no agent receipted within ``ttl_s``: dropped from tracking (and from the outbox)."""
        now = self._clock()
        gone = [key for key, p in self._pending.items() if now - p.first_sent >= self.ttl_s]
        return [self._pending.pop(key).item for key in gone]
