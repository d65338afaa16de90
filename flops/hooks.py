"""The contract between the manager and the stage modules: decisions and what a stage may ask for.

A stage hook never raises for an expected refusal; it returns a :class:`Decision` (accept / reject / ignore,
with the reason that reaches the user) and asks the :class:`StageContext` for side effects (commands,
events), which the manager commits with the event that caused them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from flops.agents import AgentRegistry
from flops.lifecycle import Project
from flops.messages import AgentStatus, CommandKind, ReportBase
from flops.settings import Settings


@dataclass(frozen=True)
class Decision:
    verdict: Literal["accept", "reject", "ignore"]
    reason: str = ""
    trigger: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    # An optional trigger is an opportunistic "advance if the guards allow": a refusal is not an error.
    optional: bool = False

    @classmethod
    def accept(cls, trigger: str | None = None, **data: Any) -> Decision:
        return cls("accept", trigger=trigger, data=data)

    @classmethod
    def advance_if_ready(cls, trigger: str, **data: Any) -> Decision:
        return cls("accept", trigger=trigger, data=data, optional=True)

    @classmethod
    def reject(cls, reason: str) -> Decision:
        return cls("reject", reason)

    @classmethod
    def ignore(cls, reason: str) -> Decision:
        return cls("ignore", reason)

    @classmethod
    def fail(cls, reason: str) -> Decision:
        """Accept the message and fail the project with ``reason``."""
        return cls("accept", trigger="fail", data={"reason": reason})


@dataclass(frozen=True)
class Internal:
    """An event the manager makes itself (a resolved commit, an agent going offline, a deadline)."""

    project_id: str
    kind: str
    data: dict[str, Any] = field(default_factory=dict)


class StageContext(Protocol):
    settings: Settings
    agents: AgentRegistry

    def command(self, project: Project, agent_id: str, kind: CommandKind, spec: dict[str, Any]) -> str:
        """Queue a command for an agent; returns its deterministic command id."""

    def event(self, project: Project, kind: str, message: str, **data: Any) -> None:
        """Append to the project's event stream."""

    def get_artifact(self, key: str) -> dict[str, Any] | None: ...

    def put_artifact(self, key: str, artifact: dict[str, Any]) -> None: ...

    def resolve_commit(self, project: Project) -> None:
        """Start resolving the repo's commit off the worker; the answer arrives as an Internal event."""

    def now(self) -> float: ...

    def ports_in_use(self, agent_id: str) -> set[int]:
        """Aggregator ports that unfinished projects hold on an agent."""


class StageHooks:
    """What a stage does; every method has a do-nothing default."""

    def on_enter(self, project: Project, ctx: StageContext) -> Decision | None:
        """Run once when the project enters the stage; may return a follow-up trigger."""
        return None

    def on_report(self, project: Project, report: ReportBase, ctx: StageContext) -> Decision:
        return Decision.ignore(f"{report.kind} is not expected in stage {project.stage}")

    def on_internal(self, project: Project, event: Internal, ctx: StageContext) -> Decision:
        return Decision.ignore(f"{event.kind} is not expected in stage {project.stage}")

    def on_agent(self, project: Project, status: AgentStatus, ctx: StageContext) -> Decision:
        """An agent's status changed (birth, capabilities, last will)."""
        if not status.online and status.agent_id in project.ctx.get("critical_agents", []):
            return Decision.fail(f"agent {status.agent_id} went offline during {project.stage}")
        return Decision.ignore("")

    def on_resume(self, project: Project, ctx: StageContext) -> Decision | None:
        """Run when a restarted manager puts the project back at this stage."""
        return None
