"""Aggregation: start the Flower aggregator, follow its rounds, keep the best model it reports."""

from __future__ import annotations

from flops.hooks import Decision, StageContext, StageHooks
from flops.lifecycle import Project
from flops.lifecycle_stages import Stage
from flops.messages import (
    AgentStatus,
    AggregatorStarted,
    CommandFailed,
    LearnerFailed,
    LearnerReady,
    ReportBase,
    RoundCompleted,
    TrainingFailed,
    TrainingSucceeded,
)
from flops.tracking.project import aggregator_spec
from stages import hierarchy


def aggregator_timeouts(project: Project, ctx: StageContext) -> dict[str, float]:
    """The aggregator's own bounds, from the project's deadlines (settings, overridden by the SLA's).

    The whole training (``deadline_s``) and any one round (``round_timeout_s``) may take the aggregation
    stage's deadline, the manager's bound on them; waiting for the learners' SuperNodes to connect
    (``client_wait_s``) may take what the learners stage may, within that.
    """
    overrides = project.sla.deadlines
    overall = ctx.settings.deadlines.for_stage(Stage.AGGREGATION, overrides) or 3600.0
    learners = ctx.settings.deadlines.for_stage(Stage.LEARNERS, overrides) or overall
    return {"deadline_s": overall, "round_timeout_s": overall, "client_wait_s": min(learners, overall)}


class Aggregation(StageHooks):
    def on_enter(self, project: Project, ctx: StageContext) -> Decision | None:
        if hierarchy.is_hierarchical(project):
            hierarchy.start_aggregators(project, ctx, aggregator_timeouts(project, ctx))
            return None
        tc = project.sla.training_configuration
        aggregator = project.ctx["aggregator"]
        keys: dict[str, str] = project.ctx.get("learner_keys", {})
        project.ctx["aggregator_command_id"] = ctx.command(
            project,
            aggregator["agent_id"],
            "run_aggregator",
            {
                "artifact": project.ctx.get("artifact", {}),
                "port": aggregator["port"],
                "address": aggregator["address"],
                "rounds": tc.training_rounds,
                "min_available_clients": tc.min_available_clients,
                "min_fit_clients": tc.min_fit_clients,
                "min_evaluate_clients": tc.min_evaluate_clients,
                "strategy": tc.strategy.value,
                "strategy_params": tc.strategy_settings(),
                **aggregator_timeouts(project, ctx),
                "learners": len(project.ctx.get("learners", {})),
                # Only these learners' SuperNodes may join (registered when the SuperLink runs TLS).
                "supernode_keys": [keys[agent] for agent in sorted(keys)],
                "tracking": aggregator_spec(project),
                # Whose registry namespace its model files go to where they must leave its container (Oakestra).
                "customer": project.record.customer,
                **project.sla.actor_resources(),
            },
        )
        project.ctx["progress"] = {"round": 0, "rounds": tc.training_rounds}
        project.ctx["critical_agents"] = [aggregator["agent_id"]]
        return None

    def on_report(self, project: Project, report: ReportBase, ctx: StageContext) -> Decision:
        if hierarchy.is_hierarchical(project) and (decided := hierarchy.on_aggregation_report(project, report, ctx)):
            return decided
        pending = project.ctx.get("aggregator_command_id")
        if isinstance(report, AggregatorStarted) and report.command_id == pending:
            project.ctx["aggregator"]["address"] = report.address
            ctx.event(project, "report.accepted", f"aggregator listening on {report.address}")
            return Decision.accept()
        if isinstance(report, RoundCompleted) and report.command_id == pending:
            progress = project.ctx.setdefault("progress", {})
            if report.round > progress.get("round", 0):
                progress.update(round=report.round, loss=report.loss, accuracy=report.accuracy)
            ctx.event(
                project,
                "round.completed",
                f"round {report.round}/{progress.get('rounds')}: loss {report.loss} accuracy {report.accuracy}",
                **report.model_dump(include={"round", "loss", "accuracy", "examples", "duration_s", "drift"}),
            )
            return Decision.accept()
        if isinstance(report, TrainingSucceeded):
            if report.command_id == pending:
                project.ctx["model"] = report.model_dump(include={"best_round", "loss", "accuracy", "model_ref"})
            return Decision.accept("trained", command_id=report.command_id)
        if isinstance(report, TrainingFailed | CommandFailed) and report.command_id == pending:
            tail = f"\n{report.log_tail}" if report.log_tail else ""
            return Decision.fail(f"training failed: {report.reason}{tail}")
        if isinstance(report, LearnerFailed) and report.command_id in project.ctx.get("learners", {}).values():
            return self._learner_lost(project, report.agent_id, report.reason, ctx)
        if isinstance(report, LearnerFailed):
            ctx.event(project, "warning", f"learner on {report.agent_id} failed: {report.reason}")
            return Decision.accept()
        if isinstance(report, LearnerReady):
            return Decision.ignore("learner.ready after aggregation started")
        return super().on_report(project, report, ctx)

    def on_agent(self, project: Project, status: AgentStatus, ctx: StageContext) -> Decision:
        # The aggregator's agent may be a learner too: losing it fails the project (StageHooks.on_agent).
        learner_only = status.agent_id not in project.ctx.get("critical_agents", [])
        if not status.online and learner_only and status.agent_id in project.ctx.get("learners", {}):
            if hierarchy.is_hierarchical(project):
                return hierarchy.learner_lost(project, status.agent_id, "its agent went offline", ctx)
            return self._learner_lost(project, status.agent_id, "its agent went offline", ctx)
        return super().on_agent(project, status, ctx)

    @staticmethod
    def _learner_lost(project: Project, agent_id: str, reason: str, ctx: StageContext) -> Decision:
        """A learner of this project is gone for good. Flower waits for ``min_available_clients`` connected
        learners before every round, forever: with fewer left the training can never finish, so fail now."""
        tc = project.sla.training_configuration
        lost: list[str] = project.ctx.setdefault("learners_lost", [])
        if agent_id not in lost:
            lost.append(agent_id)
            lost.sort()
        left = len(project.ctx.get("learners", {})) - len(lost)
        need = max(tc.min_available_clients, tc.min_fit_clients, tc.min_evaluate_clients)
        if left < need:
            return Decision.fail(
                f"learner on {agent_id} failed: {reason}; {left} learner(s) left, fewer than the {need} training "
                f"needs (min_fit_clients {tc.min_fit_clients}, min_available_clients {tc.min_available_clients})"
            )
        ctx.event(project, "warning", f"learner on {agent_id} failed: {reason}; {left} learner(s) left")
        return Decision.accept()


HOOKS = Aggregation()
