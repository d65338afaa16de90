"""What one look at an Oakestra service means for the FLOps actor it runs: events and a verdict.

Oakestra has no event stream, only documents to poll, and its statuses need interpreting (``oakestra-api.md`` §4,
§6): the service-level status is the last event of any instance, so instances are judged one by one; failed and
dead instances are redeployed forever, so FLOps gives up after a few restarts or a failure that lasts; a negative
scheduling status is final; an instance stuck in a phase past its deadline will not move on. No IO here: the
caller fetches the document and acts on the verdict (:mod:`flops.oakestra.deploy`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from flops.oakestra import statuses as st
from flops.oakestra.models import Instance, Service


class EventKind(StrEnum):
    CREATED = "created"  # the service exists in Oakestra
    SCHEDULED = "scheduled"  # an instance was given a cluster
    PLACED = "placed"  # an instance was given a node
    RUNNING = "running"
    RESTARTED = "restarted"  # an instance failed or died; Oakestra redeploys it
    COMPLETED = "completed"  # every instance of a one-shot actor exited 0
    FAILED = "failed"  # FLOps gave up on the actor (reason says why)
    DELETED = "deleted"  # the service is gone from Oakestra


class Phase(StrEnum):
    PENDING = "pending"  # not every instance runs yet
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class ActorEvent:
    """Something a user would want to know about one actor of a project."""

    actor: str
    kind: EventKind
    service_id: str | None = None
    instance: int | None = None
    cluster: str | None = None
    node: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Timing:
    """How often to look and how long each phase may last (defaults from the contract's recommendations)."""

    poll_interval: float = 3.0
    schedule_deadline: float = 30.0  # REQUESTED → an instance on a cluster
    node_deadline: float = 60.0  # CLUSTER_SCHEDULED → NODE_SCHEDULED (a cluster that cannot place hangs here)
    start_deadline: float = 600.0  # on a node → RUNNING/COMPLETED: an image pull (the builder's is ~3 GB)
    failure_grace: float = 60.0  # FAILED/DEAD seen without a break (the root may never see the restarts)
    max_restarts: int = 2  # failures tolerated per instance; the next one is final


@dataclass
class InstanceView:
    status: str
    since: float
    failures: int = 0


@dataclass
class ActorState:
    """What FLOps knows of one actor's service between two looks."""

    name: str
    one_shot: bool
    service_id: str | None = None
    requested: int = 0  # instances asked for (S4 calls)
    requested_at: float = 0.0
    instances: dict[int, InstanceView] = field(default_factory=dict)
    phase: Phase = Phase.PENDING
    reason: str | None = None
    deleted: bool = False

    @property
    def settled(self) -> bool:
        """Nothing more to wait for: completed or failed, or running unless it is a one-shot (whose outcome is
        its exit). A running actor is still watched: it may crash."""
        if self.one_shot:
            return self.done
        return self.phase is not Phase.PENDING

    @property
    def done(self) -> bool:
        return self.phase in (Phase.COMPLETED, Phase.FAILED) or self.deleted


@dataclass(frozen=True)
class Verdict:
    """The events of one look and what to do: ``delete`` the service (completed or given up)."""

    events: list[ActorEvent]
    delete: bool = False


def _deadline(status: str, timing: Timing) -> float | None:
    if status == st.CLUSTER_SCHEDULED:
        return timing.node_deadline
    if status in st.STARTING or status == st.REQUESTED:
        return timing.start_deadline
    if status in st.BROKEN:
        return timing.failure_grace
    return None


def observe(
    actor: ActorState, service: Service | None, now: float, timing: Timing, cluster_name: Callable[[str | None], str]
) -> Verdict:
    """Fold one look at the actor's service into ``actor``; the events it caused and whether to delete it."""
    events: list[ActorEvent] = []

    def event(
        kind: EventKind,
        inst: Instance | None = None,
        *,
        cluster: str | None = None,
        node: str | None = None,
        reason: str | None = None,
    ) -> None:
        number = inst.number if inst else None
        events.append(ActorEvent(actor.name, kind, actor.service_id, number, cluster, node, reason))

    def fail(reason: str) -> Verdict:
        actor.phase, actor.reason = Phase.FAILED, reason
        event(EventKind.FAILED, reason=reason)
        return Verdict(events, delete=service is not None)

    if actor.done:
        return Verdict(events)
    if service is None:
        return fail(f"{actor.name}: its Oakestra service {actor.service_id} no longer exists")
    if service.status in st.NEGATIVE:
        return fail(f"{actor.name}: Oakestra could not place it ({service.status})")

    for inst in service.instances:
        node = inst.worker_id or inst.host_ip
        view = actor.instances.get(inst.number)
        if view is None:
            view = actor.instances[inst.number] = InstanceView("", now)
            event(EventKind.SCHEDULED, inst, cluster=cluster_name(inst.cluster_id))
        if inst.status != view.status:
            view.status, view.since = inst.status, now
            if inst.status in st.STARTING:
                event(EventKind.PLACED, inst, node=node)
            elif inst.status == st.RUNNING:
                event(EventKind.RUNNING, inst, node=node)
            elif inst.status in st.BROKEN:
                view.failures += 1
                what = f"{actor.name} instance {inst.number} {inst.status}: {inst.status_detail or 'no detail'}"
                if actor.one_shot and inst.status == st.DEAD:
                    return fail(f"{what} (a one-shot that exits non-zero has failed)")
                if view.failures > timing.max_restarts:
                    return fail(f"{what}; {view.failures} failures, gave up (Oakestra would restart it forever)")
                event(EventKind.RESTARTED, inst, node=node, reason=f"{what} ({view.failures}/{timing.max_restarts})")
            continue
        limit = _deadline(inst.status, timing)
        if limit is not None and now - view.since > limit:
            detail = f": {inst.status_detail}" if inst.status_detail and inst.status in st.BROKEN else ""
            return fail(f"{actor.name} instance {inst.number} still {inst.status} after {limit:g} s{detail}")

    statuses = [view.status for view in actor.instances.values()]
    if len(statuses) < actor.requested and now - actor.requested_at > timing.schedule_deadline:
        return fail(
            f"{actor.name}: not scheduled on any cluster within {timing.schedule_deadline:g} s ({service.status})"
        )
    if len(statuses) >= actor.requested and statuses and all(s == st.COMPLETED for s in statuses):
        actor.phase = Phase.COMPLETED
        event(EventKind.COMPLETED)
        return Verdict(events, delete=True)
    if len(statuses) >= actor.requested and statuses and all(s == st.RUNNING for s in statuses):
        actor.phase = Phase.RUNNING
    elif actor.phase is Phase.RUNNING:
        actor.phase = Phase.PENDING  # an instance restarts: not settled until it runs again
    return Verdict(events)
