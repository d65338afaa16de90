"""Builder: reuse a cached artifact for (repo, commit, platforms, flavor) or ask a builder agent to build."""

from __future__ import annotations

import hashlib

from flops.hooks import Decision, StageContext, StageHooks
from flops.lifecycle import Project
from flops.messages import BuildFailed, BuildStarted, BuildSucceeded, CommandFailed, ReportBase


def cache_key(project: Project, commit: str, artifacts: str = "env") -> str:
    sla = project.sla
    platforms = ",".join(sorted(p.value for p in sla.supported_platforms))
    raw = f"{sla.ml_repo_url}|{commit}|{platforms}|{sla.ml_model_flavor.value}"
    if artifacts != "env":  # environment keys stay what they were before images existed
        raw += f"|{artifacts}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Builder(StageHooks):
    def on_enter(self, project: Project, ctx: StageContext) -> Decision | None:
        commit = project.ctx["commit"]
        key = cache_key(project, commit, ctx.settings.artifacts)
        cached = ctx.get_artifact(key)
        if cached is not None:
            project.ctx["artifact"] = cached
            ctx.event(project, "report.accepted", "artifact cache hit: build skipped", cached=True, key=key)
            return Decision.accept("built", cached=True)
        platforms = {p.value for p in project.sla.supported_platforms}
        builders = [a for a in ctx.agents.online("builder") if a.platform in platforms] or ctx.agents.online("builder")
        if not builders:
            return Decision.fail("no online builder agent")
        agent = builders[0]
        project.ctx["build_command_id"] = ctx.command(
            project,
            agent.agent_id,
            "build",
            {
                "repo_url": project.sla.ml_repo_url,
                "commit": commit,
                "flavor": project.sla.ml_model_flavor.value,
                "platforms": sorted(platforms),
                "cache_key": key,
                "backend": ctx.settings.artifacts,
            },
        )
        project.ctx["critical_agents"] = [agent.agent_id]
        return None

    def on_report(self, project: Project, report: ReportBase, ctx: StageContext) -> Decision:
        pending = project.ctx.get("build_command_id")
        if isinstance(report, BuildStarted):
            return Decision.accept() if report.command_id == pending else Decision.ignore("stale build.started")
        if isinstance(report, BuildSucceeded):
            if report.command_id == pending:
                artifact = report.artifact.model_dump()
                artifact["warnings"] = report.warnings
                project.ctx["artifact"] = artifact
                ctx.put_artifact(cache_key(project, project.ctx["commit"], ctx.settings.artifacts), artifact)
                for warning in report.warnings:
                    ctx.event(project, "warning", f"build: {warning}")
            return Decision.accept("built", command_id=report.command_id)
        if isinstance(report, BuildFailed | CommandFailed) and report.command_id == pending:
            tail = f"\n{report.log_tail}" if report.log_tail else ""
            return Decision.fail(f"build failed: {report.reason}{tail}")
        return super().on_report(project, report, ctx)


HOOKS = Builder()
