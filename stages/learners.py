"""Learners: pick agents holding the data, pick the aggregator's place, start one learner per agent."""

from __future__ import annotations

import hashlib
import secrets

from flops.hooks import Decision, StageContext, StageHooks
from flops.lifecycle import Project
from flops.messages import AgentStatus, CommandFailed, LearnerFailed, LearnerReady, ReportBase
from flops.sla import TrainingMode
from stages import hierarchy


def allocate_port(project: Project, agent_id: str, ctx: StageContext, in_use: set[int]) -> int:
    """A port of the aggregator range that no unfinished project of this manager uses on that agent.

    The scan starts at a point derived from the project id, so two managers (or a demo beside a real fleet)
    driving agents on one host rarely pick the same port; a port taken anyway fails the aggregator loudly.
    """
    low, high = ctx.settings.aggregator_ports
    size = high - low + 1
    start = int(hashlib.sha256(project.project_id.encode()).hexdigest(), 16) % size
    for offset in range(size):
        port = low + (start + offset) % size
        if port not in in_use:
            return port
    raise RuntimeError(f"no free aggregator port on {agent_id} in {low}-{high}")


class Learners(StageHooks):
    def on_enter(self, project: Project, ctx: StageContext) -> Decision | None:
        tc = project.sla.training_configuration
        need = tc.min_available_clients
        candidates = ctx.agents.learners_for(tc.data_tags)
        if tc.mode is TrainingMode.HIERARCHICAL:
            return hierarchy.place(project, ctx, allocate_port)
        if len(candidates) < need:
            return Decision.fail(f"only {len(candidates)} of {need} learner agents with the data are online")
        aggregators = ctx.agents.online("aggregator")
        if not aggregators:
            return Decision.fail("no online aggregator agent")
        aggregator = aggregators[0]
        port = allocate_port(project, aggregator.agent_id, ctx, ctx.ports_in_use(aggregator.agent_id))
        address = f"{aggregator.host}:{port}"
        project.ctx["aggregator"] = {"agent_id": aggregator.agent_id, "port": port, "address": address}
        learners = {}
        for index, agent in enumerate(candidates[:need]):
            learners[agent.agent_id] = ctx.command(
                project,
                agent.agent_id,
                "run_learner",
                {
                    "artifact": project.ctx.get("artifact", {}),
                    "data_tags": tc.data_tags,
                    "aggregator_address": address,
                    "index": index,
                    # The learner's read token for its node's data server, for this project's tags only;
                    # the agent revokes it when the project stops.
                    "data_token": secrets.token_urlsafe(24),
                    **project.sla.actor_resources(),
                },
            )
        project.ctx["learners"] = learners
        project.ctx["learners_ready"] = []
        project.ctx["learner_keys"] = {}
        project.ctx["critical_agents"] = sorted(learners)
        return None

    def on_report(self, project: Project, report: ReportBase, ctx: StageContext) -> Decision:
        learners: dict[str, str] = project.ctx.get("learners", {})
        if isinstance(report, LearnerReady):
            if learners.get(report.agent_id) != report.command_id:
                return Decision.ignore(f"learner.ready from {report.agent_id} answers no pending command")
            ready: list[str] = project.ctx["learners_ready"]
            if report.agent_id not in ready:
                ready.append(report.agent_id)
                ready.sort()
                if report.public_key:
                    project.ctx.setdefault("learner_keys", {})[report.agent_id] = report.public_key
                ctx.event(
                    project,
                    "report.accepted",
                    f"learner on {report.agent_id} ready ({len(ready)}/{len(learners)})",
                    examples=report.examples,
                    agent_id=report.agent_id,
                )
            if hierarchy.is_hierarchical(project) and not hierarchy.all_learners_ready(project):
                return Decision.accept()  # every chosen cluster's learners, not min_available_clients in all
            return Decision.advance_if_ready("learners_ready")
        if isinstance(report, LearnerFailed | CommandFailed) and report.command_id in learners.values():
            tail = f"\n{report.log_tail}" if report.log_tail else ""
            return Decision.fail(f"learner failed: {report.reason}{tail}")
        return super().on_report(project, report, ctx)

    def on_agent(self, project: Project, status: AgentStatus, ctx: StageContext) -> Decision:
        seats = [project.ctx.get("aggregator", {}), *project.ctx.get("clusters", {}).values()]
        if not status.online and status.agent_id in {seat.get("agent_id") for seat in seats}:
            return Decision.fail(f"aggregator agent {status.agent_id} went offline")
        return super().on_agent(project, status, ctx)


HOOKS = Learners()
