"""Preparation: pin the repo to a commit and wait until enough agents hold the data (plus a builder)."""

from __future__ import annotations

from flops.builder.repo import FULL_SHA
from flops.hooks import Decision, Internal, StageContext, StageHooks
from flops.lifecycle import Project
from flops.messages import AgentStatus
from flops.sla import TrainingMode
from stages.builder import cache_key
from stages.hierarchy import missing_clusters


def missing_inventory(project: Project, ctx: StageContext) -> str | None:
    """What is still missing before the project can start, or None when the inventory is satisfied."""
    tc = project.sla.training_configuration
    need = tc.min_available_clients
    missing = []
    if tc.mode is TrainingMode.HIERARCHICAL:
        if lacking := missing_clusters(tc, ctx.agents):
            missing.append(lacking)
    else:
        have = len(ctx.agents.learners_for(tc.data_tags))
        if have < need:
            tags = f" holding {tc.data_tags}" if tc.data_tags else ""
            missing.append(f"{have} of {need} online learner agents{tags}")
    if not ctx.agents.online("aggregator"):
        missing.append("no online aggregator agent")
    commit = project.ctx.get("commit")
    cached = commit is not None and ctx.get_artifact(cache_key(project, commit, ctx.settings.artifacts)) is not None
    if not cached and not ctx.agents.online("builder"):
        missing.append("no online builder agent")
    return "; ".join(missing) or None


class Preparation(StageHooks):
    def on_enter(self, project: Project, ctx: StageContext) -> Decision | None:
        pinned = project.sla.ml_repo_commit
        if pinned and FULL_SHA.match(pinned):
            project.ctx["commit"] = pinned.lower()
        else:
            ctx.resolve_commit(project)
        return self._check(project, ctx)

    def on_internal(self, project: Project, event: Internal, ctx: StageContext) -> Decision:
        if event.kind == "repo.resolved":
            project.ctx["commit"] = event.data["commit"]
            ctx.event(project, "report.accepted", f"repository pinned at {event.data['commit'][:12]}")
            return self._check(project, ctx) or Decision.accept()
        if event.kind == "repo.unresolved":
            return Decision.fail(f"cannot resolve {project.sla.ml_repo_url}: {event.data['reason']}")
        return super().on_internal(project, event, ctx)

    def on_agent(self, project: Project, status: AgentStatus, ctx: StageContext) -> Decision:
        return self._check(project, ctx) or Decision.ignore("inventory unchanged")

    def on_resume(self, project: Project, ctx: StageContext) -> Decision | None:
        if not project.ctx.get("commit"):
            ctx.resolve_commit(project)
        return self._check(project, ctx)

    def _check(self, project: Project, ctx: StageContext) -> Decision | None:
        missing = missing_inventory(project, ctx)
        project.ctx["inventory_ok"] = missing is None
        if missing is not None:
            if project.ctx.get("waiting_for") != missing:
                project.ctx["waiting_for"] = missing
                ctx.event(project, "warning", f"waiting for: {missing}")
            return None
        project.ctx.pop("waiting_for", None)
        if not project.ctx.get("commit"):
            return None
        return Decision.advance_if_ready("prepared")


HOOKS = Preparation()
