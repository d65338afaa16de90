"""The project lifecycle: the stage table as data, its named guards, and the one machine for all projects.

Stage modules (``stages/<stage>.py``) say what happens inside a stage; this module says which edges exist.
Bookkeeping (stamp ``<stage>_at``, deadline, transition log, events, retained state) lives in one hook,
:func:`Project.after_change`, run after every transition.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transitions import EventData, Machine

from flops.lifecycle_stages import ACTIVE_STAGES, Outcome, Stage
from flops.sla import ProjectSLA
from flops.store import ProjectRecord, Transition

# --- guards: small named predicates; each returns None (pass) or the reason it refuses -----------------

Guard = Callable[["Project", dict[str, Any]], str | None]


def require_inventory(project: Project, data: dict[str, Any]) -> str | None:
    """Refuse to leave preparation before enough learner agents with the data (and a builder) are online.

    Prevents starting builds and learners for a project that cannot possibly train.
    """
    return None if project.ctx.get("inventory_ok") else "not enough online agents hold the requested data"


def require_resolved_commit(project: Project, data: dict[str, Any]) -> str | None:
    """Refuse to leave preparation before the repo is pinned to a commit.

    Prevents two builds of "the same" project from silently training different code.
    """
    return None if project.ctx.get("commit") else "the repository commit is not resolved yet"


def reject_stale_build_result(project: Project, data: dict[str, Any]) -> str | None:
    """Refuse a build result that answers another build command than the one this project waits for.

    Prevents a late result of a superseded (or another project's) build from advancing the project.
    """
    expected = project.ctx.get("build_command_id")
    got = data.get("command_id")
    if data.get("cached"):
        return None
    if expected is None or got != expected:
        return f"build result for command {got} does not answer the pending build {expected}"
    return None


def require_enough_learners(project: Project, data: dict[str, Any]) -> str | None:
    """Refuse to start aggregation before min_available_clients learners reported ready.

    Prevents Flower from waiting forever for clients that will never connect.
    """
    ready = len(project.ctx.get("learners_ready", []))
    need = project.sla.training_configuration.min_available_clients
    return None if ready >= need else f"{ready} of {need} learners ready"


def reject_stale_training_result(project: Project, data: dict[str, Any]) -> str | None:
    """Refuse a training result from an aggregator command this project did not issue (or no longer runs).

    Prevents a previous attempt's aggregator from finishing the project with the wrong model.
    """
    expected = project.ctx.get("aggregator_command_id")
    got = data.get("command_id")
    if expected is None or got != expected:
        return f"training result for command {got} does not answer the running aggregator {expected}"
    return None


def require_deadline_passed(project: Project, data: dict[str, Any]) -> str | None:
    """Refuse a time-out for a stage the project already left or whose deadline is still ahead.

    Prevents a deadline computed for an earlier stage from failing the project in a later one.
    """
    if data.get("stage") != project.stage:
        return f"deadline was for {data.get('stage')}, project is in {project.stage}"
    if project.record.deadline_at is None or data.get("now", time.time()) < project.record.deadline_at:
        return "deadline not reached"
    return None


# --- the table ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    trigger: str
    source: tuple[Stage, ...]
    dest: Stage
    guards: tuple[Guard, ...] = ()
    outcome: Outcome | None = None


EDGES: tuple[Edge, ...] = (
    Edge("prepared", (Stage.PREPARATION,), Stage.START, (require_resolved_commit, require_inventory)),
    Edge("started", (Stage.START,), Stage.BUILDER),
    Edge("built", (Stage.BUILDER,), Stage.LEARNERS, (reject_stale_build_result,)),
    Edge("learners_ready", (Stage.LEARNERS,), Stage.AGGREGATION, (require_enough_learners,)),
    Edge("trained", (Stage.AGGREGATION,), Stage.POST_TRAINING, (reject_stale_training_result,)),
    Edge("post_trained", (Stage.POST_TRAINING,), Stage.FINISHED, outcome=Outcome.COMPLETED),
    Edge("fail", ACTIVE_STAGES, Stage.FINISHED, outcome=Outcome.FAILED),
    Edge("cancel", ACTIVE_STAGES, Stage.FINISHED, outcome=Outcome.CANCELLED),
    Edge("time_out", ACTIVE_STAGES, Stage.FINISHED, (require_deadline_passed,), outcome=Outcome.FAILED),
)

TRIGGERS = frozenset(e.trigger for e in EDGES)
_TRIGGERS_FROM = {stage: frozenset(e.trigger for e in EDGES if stage in e.source) for stage in Stage}


# --- the model ---------------------------------------------------------------------------------------


@dataclass(eq=False)  # identity, not field equality: the machine does `in` / `remove` on its model list
class Project:
    """One project in the machine: its persisted record plus what handling the current event produced."""

    record: ProjectRecord
    sla: ProjectSLA
    # Filled while an event is handled; drained by the manager into the store and outbox.
    transitions: list[Transition] = field(default_factory=list)
    refusal: str | None = None
    on_change: Callable[[Project, Stage, Stage, str, dict[str, Any]], None] | None = None
    stage: Stage = Stage.PREPARATION  # managed by transitions (model_attribute)
    # Transient, while one event is handled: the manager's effects collector and a stage entry's follow-up.
    effects: Any = None
    follow_up: Any = None

    @property
    def project_id(self) -> str:
        return self.record.project_id

    @property
    def ctx(self) -> dict[str, Any]:
        return self.record.ctx


def _guard_condition(guard: Guard) -> Callable[[EventData], bool]:
    def condition(event: EventData) -> bool:
        project: Project = event.model
        reason = guard(project, event.kwargs)
        if reason is not None:
            project.refusal = f"{guard.__name__}: {reason}"
        return reason is None

    condition.__name__ = guard.__name__
    return condition


class Lifecycle:
    """One ``transitions`` Machine holding every unfinished project."""

    def __init__(self) -> None:
        self.machine = Machine(
            model=None,
            states=list(Stage),
            initial=Stage.PREPARATION,
            transitions=[
                {
                    "trigger": e.trigger,
                    "source": list(e.source),
                    "dest": e.dest,
                    "conditions": [_guard_condition(g) for g in e.guards],
                }
                for e in EDGES
            ],
            auto_transitions=False,
            send_event=True,
            model_attribute="stage",
            after_state_change=self._after_change,
        )
        self.projects: dict[str, Project] = {}

    def add(self, project: Project) -> Project:
        """Put a project into the machine at its stored stage (no entry callbacks run)."""
        self.machine.add_model(project, initial=project.record.stage)
        self.projects[project.project_id] = project
        return project

    def remove(self, project_id: str) -> None:
        project = self.projects.pop(project_id, None)
        if project is not None:
            self.machine.remove_model(project)

    def fire(self, project: Project, trigger: str, **data: Any) -> bool:
        """Try one transition; False (with ``project.refusal`` set) when a guard or the table refuses it."""
        project.refusal = None
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown trigger {trigger}")
        if trigger not in _TRIGGERS_FROM[project.stage]:
            project.refusal = f"{trigger} is not possible in stage {project.stage}"
            return False
        return bool(project.trigger(trigger, **data))

    @staticmethod
    def _after_change(event: EventData) -> None:
        project: Project = event.model
        # transitions names Enum states by member name ("PREPARATION").
        source = Stage[event.transition.source]
        dest = Stage[event.transition.dest]
        if project.on_change is not None:
            project.on_change(project, source, dest, event.event.name, event.kwargs)


def edges_for(stage: Stage) -> list[Edge]:
    return [e for e in EDGES if stage in e.source]


def mermaid() -> str:
    """The stage diagram, rendered from the table (for the README)."""
    lines = ["stateDiagram-v2", f"    [*] --> {Stage.PREPARATION.value}"]
    for edge in EDGES:
        if len(edge.source) > 1:
            continue
        label = edge.trigger + (f" [{', '.join(g.__name__ for g in edge.guards)}]" if edge.guards else "")
        lines.append(f"    {edge.source[0].value} --> {edge.dest.value}: {label}")
    anywhere = ", ".join(e.trigger for e in EDGES if len(e.source) > 1)
    lines.append(f"    note right of {Stage.FINISHED.value}: from any active stage: {anywhere}")
    lines.append(f"    {Stage.FINISHED.value} --> [*]")
    return "\n".join(lines)
