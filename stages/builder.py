"""Builder: reuse a cached artifact for (repo, commit, platforms, flavor) or ask a builder agent to build."""

from __future__ import annotations

import hashlib
from typing import Any

from flops.hooks import Decision, StageContext, StageHooks
from flops.lifecycle import Project
from flops.messages import BuildFailed, BuildStarted, BuildSucceeded, CommandFailed, ReportBase
from flops.sla import CLIENT_SIDE_STRATEGIES


def cache_key(project: Project, commit: str, artifacts: str = "env") -> str:
    sla = project.sla
    platforms = ",".join(sorted(p.value for p in sla.supported_platforms))
    raw = f"{sla.ml_repo_url}|{commit}|{platforms}|{sla.ml_model_flavor.value}"
    if artifacts != "env":  # environment keys stay what they were before images existed
        raw += f"|{artifacts}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


def refuse_unsupported_strategy(project: Project, artifact: dict[str, Any]) -> str | None:
    """Why the built repo cannot run the SLA's strategy, or None.

    A strategy with a client side (FedProx's proximal term) changes the learners' local training, which only
    the repo can do: a repo whose ``fit_model()`` takes no configuration (the original FLOps contract) would
    silently train FedAvg. An artifact recorded before this was checked says nothing; its learners refuse
    the strategy at the first round instead.
    """
    strategy = project.sla.training_configuration.strategy
    takes_config = artifact.get("details", {}).get("fit_model_takes_config")
    if strategy not in CLIENT_SIDE_STRATEGIES or takes_config is not False:
        return None
    return (
        f"strategy {strategy.value} needs the repository's help: ModelManager.fit_model() in model_manager.py "
        "takes no configuration, so it cannot add the proximal term (proximal_mu) to its local training; "
        "define fit_model(self, config) and use config['proximal_mu'] (see examples/ml_repos/digits_sklearn), "
        "or choose strategy fedavg or fedadam"
    )


class Builder(StageHooks):
    def on_enter(self, project: Project, ctx: StageContext) -> Decision | None:
        commit = project.ctx["commit"]
        key = cache_key(project, commit, ctx.settings.artifacts)
        cached = ctx.get_artifact(key)
        if cached is not None:
            if refused := refuse_unsupported_strategy(project, cached):
                return Decision.fail(f"build refused: {refused}")
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
                if refused := refuse_unsupported_strategy(project, artifact):
                    return Decision.fail(f"build refused: {refused}")
            return Decision.accept("built", command_id=report.command_id)
        if isinstance(report, BuildFailed | CommandFailed) and report.command_id == pending:
            tail = f"\n{report.log_tail}" if report.log_tail else ""
            return Decision.fail(f"build failed: {report.reason}{tail}")
        return super().on_report(project, report, ctx)


HOOKS = Builder()
