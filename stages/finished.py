"""Finished: tell every agent the project used to stop what it runs for it (the model server survives
a completed project: serving it was the point)."""

from __future__ import annotations

from flops.hooks import Decision, StageContext, StageHooks
from flops.lifecycle import Project
from flops.lifecycle_stages import Outcome
from flops.messages import ReportBase


class Finished(StageHooks):
    def on_enter(self, project: Project, ctx: StageContext) -> Decision | None:
        keep = ["serve_model"] if project.record.outcome is Outcome.COMPLETED else []
        for agent_id in sorted(project.ctx.get("agents", [])):
            ctx.command(project, agent_id, "stop_project", {"keep": keep})
        project.ctx["critical_agents"] = []
        return None

    def on_report(self, project: Project, report: ReportBase, ctx: StageContext) -> Decision:
        return Decision.reject(f"project {project.project_id} is finished ({project.record.outcome})")


HOOKS = Finished()
