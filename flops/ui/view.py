"""What the web view knows: every project's latest retained state plus the events it has seen, folded into
summaries (the projects list) and details (a project page: timeline, rounds, learners, failure, links).

Pure and thread-safe: :class:`Observed` is fed from the MQTT thread and read from the web server's, and
never needs the manager's database. Events are not retained by the broker, so rounds that happened before
the view started are known only through the state's latest progress.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flops.lifecycle_stages import Stage
from flops.messages import AgentStatus, ProjectEvent, ProjectState

MAX_EVENTS = 300
"""Events kept per project for the page's event log (rounds and agents are kept apart, in full)."""

ROLE_OF_COMMAND = {
    "build": "builder",
    "run_learner": "learner",
    "run_aggregator": "aggregator",
    "build_model_image": "model builder",
    "serve_model": "model server",
}


@dataclass
class ProjectView:
    """One project as the view has seen it."""

    project_id: str
    customer: str | None = None
    state: ProjectState | None = None
    events: deque[ProjectEvent] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))
    seqs: set[int] = field(default_factory=set)
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    # Hierarchical mode: (cluster, cycle, round) -> a cluster's round; cycle -> the root's global model.
    cluster_rounds: dict[tuple[str, int, int], dict[str, Any]] = field(default_factory=dict)
    cycles: dict[int, dict[str, Any]] = field(default_factory=dict)
    # agent id -> roles it was given (from the "<kind> sent to <agent>" events)
    roles: dict[str, set[str]] = field(default_factory=dict)
    # agent id -> examples, for learners that reported ready
    ready: dict[str, int | None] = field(default_factory=dict)
    first_seen: float = field(default_factory=time.time)


class Observed:
    """The view's model: apply messages, read snapshots; every change bumps :attr:`version` and calls the
    listeners (which must only hand the news to another thread, e.g. ``loop.call_soon_threadsafe``)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._projects: dict[str, ProjectView] = {}
        self._agents: dict[str, AgentStatus] = {}
        self._listeners: list[Callable[[], None]] = []
        self._clock = clock
        self.version = 0

    # --- listeners -------------------------------------------------------------------------------

    def listen(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` after every change; returns the function that stops it."""
        with self._lock:
            self._listeners.append(callback)

        def stop() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return stop

    def _changed(self) -> None:
        with self._lock:
            self.version += 1
            listeners = list(self._listeners)
        for callback in listeners:
            callback()

    # --- input -----------------------------------------------------------------------------------

    def apply_state(self, customer: str | None, state: ProjectState) -> None:
        with self._lock:
            view = self._project(state.project_id)
            if view.state is not None and state.seq < view.state.seq:
                return  # an older state re-published after a newer one
            view.state = state
            view.customer = state.customer or customer
        self._changed()

    def apply_event(self, customer: str | None, event: ProjectEvent) -> None:
        with self._lock:
            view = self._project(event.project_id)
            if event.seq in view.seqs:
                return  # the manager re-publishes its outbox after a restart
            view.seqs.add(event.seq)
            view.customer = view.customer or customer
            view.events.append(event)
            data = event.data
            if event.kind == "round.completed":
                _fold_round(view, data, event.ts)
            agent = data.get("agent_id")
            command = data.get("command")
            if isinstance(agent, str) and command in ROLE_OF_COMMAND:
                view.roles.setdefault(agent, set()).add(ROLE_OF_COMMAND[command])
            elif isinstance(agent, str) and "examples" in data:
                view.ready[agent] = data.get("examples")
                view.roles.setdefault(agent, set()).add("learner")
        self._changed()

    def forget_project(self, project_id: str) -> None:
        """Its retained state was cleared (the manager pruned it)."""
        with self._lock:
            gone = self._projects.pop(project_id, None)
        if gone is not None:
            self._changed()

    def apply_agent(self, status: AgentStatus) -> None:
        with self._lock:
            self._agents[status.agent_id] = status
        self._changed()

    def forget_agent(self, agent_id: str) -> None:
        with self._lock:
            gone = self._agents.pop(agent_id, None)
        if gone is not None:
            self._changed()

    def _project(self, project_id: str) -> ProjectView:
        view = self._projects.get(project_id)
        if view is None:
            view = self._projects[project_id] = ProjectView(project_id, first_seen=self._clock())
        return view

    # --- output ----------------------------------------------------------------------------------

    def summaries(self) -> list[dict[str, Any]]:
        """The projects list, newest first."""
        now = self._clock()
        with self._lock:
            rows = [_summary(view, now) for view in self._projects.values() if view.state is not None]
        return sorted(rows, key=lambda r: r["submitted_at"] or 0, reverse=True)

    def detail(self, project_id: str) -> dict[str, Any] | None:
        """One project's page, or None when no state of it was seen."""
        now = self._clock()
        with self._lock:
            view = self._projects.get(project_id)
            if view is None or view.state is None:
                return None
            return _detail(view, dict(self._agents), now)


def _fold_round(view: ProjectView, data: dict[str, Any], ts: float) -> None:
    """A ``round.completed`` event: a classic round, a cluster's round of a cycle, or a root cycle."""
    values = {k: data.get(k) for k in ("loss", "accuracy", "examples", "duration_s")}
    cluster, cycle, rnd = data.get("cluster"), data.get("cycle"), data.get("round")
    if isinstance(cluster, str) and isinstance(cycle, int) and isinstance(rnd, int):
        view.cluster_rounds[(cluster, cycle, rnd)] = {"cycle": cycle, "round": rnd, **values, "ts": ts}
    elif data.get("level") == "root" and isinstance(cycle, int):
        view.cycles[cycle] = {"cycle": cycle, **values, "ts": ts}
    elif isinstance(rnd, int):
        view.rounds[rnd] = {"round": rnd, **values, "ts": ts}


def _hierarchical(view: ProjectView) -> dict[str, Any]:
    """Hierarchical mode's series: each cluster's rounds in cycle order (``step`` counts its rounds across
    cycles, the plot's x), and the root's cycles."""
    progress = view.state.progress if view.state is not None else None
    per_cycle = max([c.rounds for c in progress.clusters.values()] if progress else [], default=0)
    per_cycle = max([per_cycle, *(r for _, _, r in view.cluster_rounds)], default=0)
    clusters: dict[str, list[dict[str, Any]]] = {}
    for cluster, cycle, rnd in sorted(view.cluster_rounds):
        point = view.cluster_rounds[(cluster, cycle, rnd)]
        clusters.setdefault(cluster, []).append({**point, "step": (cycle - 1) * per_cycle + rnd})
    return {
        "cycles": progress.cycles if progress else 0,
        "rounds_per_cycle": per_cycle,
        "clusters_seen": clusters,
        "cycles_seen": [view.cycles[k] for k in sorted(view.cycles)],
    }


def _summary(view: ProjectView, now: float) -> dict[str, Any]:
    state = view.state
    assert state is not None
    submitted = state.stage_timestamps.get("preparation_at")
    finished = state.stage_timestamps.get("finished_at")
    reason, _ = _split_reason(state.reason)
    return {
        "project_id": view.project_id,
        "customer": view.customer,
        "stage": state.stage.value,
        "outcome": state.outcome.value if state.outcome else None,
        "reason": reason,
        "round": state.progress.round,
        "rounds": state.progress.rounds,
        "accuracy": state.progress.accuracy,
        "loss": state.progress.loss,
        "submitted_at": submitted,
        "age_s": now - submitted if submitted else None,
        "duration_s": (finished or now) - submitted if submitted else None,
        "updated_at": state.updated_at,
    }


def _detail(view: ProjectView, agents: dict[str, AgentStatus], now: float) -> dict[str, Any]:
    state = view.state
    assert state is not None
    reason, log_tail = _split_reason(state.reason)
    rounds = [view.rounds[k] for k in sorted(view.rounds)]
    extra = state.model_dump(mode="json")
    return {
        **_summary(view, now),
        "timeline": timeline(state, now),
        "rounds_seen": rounds,
        "hierarchical": _hierarchical(view) if view.cluster_rounds or view.cycles or state.progress.cycles else None,
        "failure": (
            {"reason": reason, "stage": state.failed_stage.value if state.failed_stage else None, "log_tail": log_tail}
            if state.outcome is not None and state.outcome.value == "failed"
            else None
        ),
        "model_url": state.model_url,
        # Set by tracking (an optional extra); absent otherwise.
        "tracking": extra.get("tracking"),
        "deadline_at": state.deadline_at,
        "agents": _agents(view, agents, now),
        "events": [
            {
                "seq": e.seq,
                "ts": e.ts,
                "kind": e.kind,
                "stage": e.stage.value if e.stage else None,
                "message": e.message,
            }
            for e in list(view.events)[-50:]
        ],
        "now": now,
    }


def timeline(state: ProjectState, now: float) -> list[dict[str, Any]]:
    """When each stage the project went through started and how long it took (the current one: so far)."""
    starts = sorted(
        (ts, stage) for stage in Stage if (ts := state.stage_timestamps.get(f"{stage.value}_at")) is not None
    )
    rows = []
    for i, (started, stage) in enumerate(starts):
        last = i == len(starts) - 1
        ends = None if last else starts[i + 1][0]
        current = last and stage is not Stage.FINISHED
        rows.append(
            {
                "stage": stage.value,
                "started_at": started,
                "seconds": (ends if ends is not None else (now if current else started)) - started,
                "current": current,
            }
        )
    return rows


def _agents(view: ProjectView, agents: dict[str, AgentStatus], now: float) -> list[dict[str, Any]]:
    rows = []
    for agent_id in sorted(view.roles):
        status = agents.get(agent_id)
        rows.append(
            {
                "agent_id": agent_id,
                "roles": sorted(view.roles[agent_id]),
                "ready": agent_id in view.ready,
                "examples": view.ready.get(agent_id),
                # None: this identity may not read agent statuses (customers in production).
                "online": status.online if status else None,
                "seen_s": now - status.ts if status else None,
                "host": status.host if status else None,
            }
        )
    return rows


def _split_reason(reason: str | None) -> tuple[str | None, str | None]:
    """A failure reason is one line, then (for worker failures) the log tail the worker sent."""
    if not reason:
        return reason, None
    first, _, rest = reason.partition("\n")
    return first, rest or None
