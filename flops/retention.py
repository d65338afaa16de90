"""Retention: the manager forgets what is older than ``retention_days``, so its store stays bounded.

Finished projects (with their transition log and seen ids) and artifact cache entries nobody used are
deleted; each forgotten project's retained state is cleared on the broker (an empty retained payload), so
``flops project list`` does not show projects the manager no longer knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flops import topics
from flops.store import OutboxItem, Store

DAY_S = 86_400.0


@dataclass
class Pruned:
    """What one prune removed, and the outbox items (committed with it) that clear the retained states."""

    projects: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    outbox: list[OutboxItem] = field(default_factory=list)


def cleared_state(customer: str, project_id: str) -> OutboxItem:
    """An empty retained message on the project's state topic: the broker drops the retained state.

    Same key as the state itself, so it replaces a state still waiting in the outbox."""
    return OutboxItem(f"state:{project_id}", topics.project_state(customer, project_id), b"", retain=True)


def prune(store: Store, before: float, *, limit: int = 1000) -> Pruned:
    """Forget up to ``limit`` projects finished before ``before`` and artifacts unused since then.

    One batch: the deletions and the outbox items that clear the retained states commit together.
    """
    with store.batch():
        pruned = store.prune(before, limit=limit)
        artifacts = store.prune_artifacts(before, limit=limit)
        with store.unit() as unit:
            items = unit.enqueue([cleared_state(p.customer, p.project_id) for p in pruned if p.customer])
    return Pruned([p.project_id for p in pruned], artifacts, items)
