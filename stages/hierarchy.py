"""Clustered hierarchical FL in the manager: which clusters take part, where their aggregators run, and how
their reports become cycle and per-cluster round progress.

Semantics (as the original FLOps): ``min_available_clients``, ``min_fit_clients`` and ``min_evaluate_clients``
are per cluster; clusters are the agents' ``--cluster`` labels (agents without one take no part). One root
aggregator runs ``training_cycles`` cycles; each cycle, every cluster aggregator (a Flower client of the root
and the server of its cluster's learners) runs ``training_rounds`` rounds from the root's global model, and the
root averages the cluster models weighted by their examples.

Which clusters take part is decided once, at learners entry, and recorded (``ctx["clusters"]``). By default
every cluster holding the data must reach the per-cluster minimum, and one that does not is refused by name;
with ``training_configuration.min_clusters`` clusters below the minimum are left out (a warning names them)
as long as that many qualify. Once training runs, losing any chosen cluster (its aggregator, or learners
below its minimum) fails the project, naming the cluster.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from flops.agents import AgentRegistry
from flops.hooks import Decision, StageContext
from flops.lifecycle import Project
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
from flops.sla import Strategy, TrainingConfiguration, TrainingMode
from flops.tracking.project import aggregator_spec


def is_hierarchical(project: Project) -> bool:
    return project.sla.training_configuration.mode is TrainingMode.HIERARCHICAL


def cluster_inventory(tc: TrainingConfiguration, agents: AgentRegistry) -> dict[str, list[AgentStatus]]:
    """Online learner agents holding the project's data, by cluster label (unlabelled agents left out)."""
    clusters: dict[str, list[AgentStatus]] = {}
    for agent in agents.learners_for(tc.data_tags):
        if agent.cluster is not None:
            clusters.setdefault(agent.cluster, []).append(agent)
    return clusters


def choose_clusters(tc: TrainingConfiguration, inventory: dict[str, list[AgentStatus]]) -> tuple[list[str], str]:
    """The clusters that take part, and why others do not (the refusal reason when none may start)."""
    need = tc.min_available_clients
    ok = sorted(c for c, agents in inventory.items() if len(agents) >= need)
    short = ", ".join(f"cluster {c} has {len(a)} of {need}" for c, a in sorted(inventory.items()) if len(a) < need)
    if tc.min_clusters is None:
        if short:
            return [], (
                f"{short} learner agents holding {tc.data_tags} (every cluster must reach the per-cluster "
                "min_available_clients; set training_configuration.min_clusters to go on without it)"
            )
        if not ok:
            return [], f"no cluster has {need} online learner agents holding {tc.data_tags}"
        return ok, ""
    if len(ok) < tc.min_clusters:
        detail = f"; {short} learner agents" if short else ""
        return [], f"{len(ok)} of min_clusters {tc.min_clusters} clusters have {need} learner agents{detail}"
    return ok, short


def missing_clusters(tc: TrainingConfiguration, agents: AgentRegistry) -> str | None:
    """Preparation's per-cluster inventory: enough clusters reach the per-cluster minimum (None), or what lacks.
    A cluster below the minimum is decided on at learners entry, where it is refused by name."""
    need = tc.min_available_clients
    want = tc.min_clusters or 1
    have = [c for c, a in cluster_inventory(tc, agents).items() if len(a) >= need]
    if len(have) >= want:
        return None
    return f"{len(have)} of {want} clusters with {need} online learners holding {tc.data_tags}"


PortAllocator = Callable[[Project, str, StageContext, set[int]], int]


def place(project: Project, ctx: StageContext, allocate: PortAllocator) -> Decision | None:
    """Learners entry: choose clusters, place the root and one aggregator per cluster, start the learners.

    ``allocate(project, agent_id, ctx, in_use) -> port`` picks an aggregator port on an agent.
    """
    tc = project.sla.training_configuration
    chosen, note = choose_clusters(tc, cluster_inventory(tc, ctx.agents))
    if not chosen:
        return Decision.fail(note)
    if note:
        ctx.event(project, "warning", f"left out: {note}")
    aggregators = ctx.agents.online("aggregator")
    if not aggregators:
        return Decision.fail("no online aggregator agent")
    root_agent = next((a for a in aggregators if a.cluster is None), aggregators[0])
    mine: set[int] = set()  # the ports this project's aggregators got so far, on any agent

    def seat(agent: AgentStatus) -> dict[str, Any]:
        # No two of the project's aggregators share a port, even on different agents: agents (or Oakestra
        # services with host networking) may share one host's network, where they would collide.
        port = allocate(project, agent.agent_id, ctx, set(ctx.ports_in_use(agent.agent_id)) | mine)
        mine.add(port)
        return {"agent_id": agent.agent_id, "port": port, "address": f"{agent.host}:{port}"}

    project.ctx["aggregator"] = seat(root_agent)
    inventory = cluster_inventory(tc, ctx.agents)
    clusters: dict[str, dict[str, Any]] = {}
    learners: dict[str, str] = {}
    for cluster in chosen:
        local = [a for a in aggregators if a.cluster == cluster]
        clusters[cluster] = seat(local[0] if local else root_agent)
        members = inventory[cluster][: tc.min_available_clients]
        clusters[cluster]["learners"] = [a.agent_id for a in members]
        for agent in members:
            learners[agent.agent_id] = ctx.command(
                project,
                agent.agent_id,
                "run_learner",
                {
                    "artifact": project.ctx.get("artifact", {}),
                    "data_tags": tc.data_tags,
                    "aggregator_address": clusters[cluster]["address"],
                    "index": len(learners),
                    "cluster": cluster,
                    "data_token": secrets.token_urlsafe(24),
                    **project.sla.actor_resources(),
                },
            )
    project.ctx["clusters"] = clusters
    project.ctx["learners"] = learners
    project.ctx["learners_ready"] = []
    project.ctx["learner_keys"] = {}
    project.ctx["critical_agents"] = sorted(learners)
    summary = "; ".join(f"{c}: {', '.join(v['learners'])} (aggregator on {v['agent_id']})" for c, v in clusters.items())
    ctx.event(project, "report.accepted", f"clusters taking part: {summary}", clusters=sorted(clusters))
    return None


def all_learners_ready(project: Project) -> bool:
    return len(project.ctx.get("learners_ready", [])) >= len(project.ctx.get("learners", {}))


def start_aggregators(project: Project, ctx: StageContext, timeouts: dict[str, float]) -> None:
    """Aggregation entry: the root (cycles of FedAvg over the clusters) and one aggregator per cluster."""
    tc = project.sla.training_configuration
    root = project.ctx["aggregator"]
    clusters: dict[str, dict[str, Any]] = project.ctx["clusters"]
    keys: dict[str, str] = project.ctx.get("learner_keys", {})
    n = len(clusters)
    project.ctx["aggregator_command_id"] = ctx.command(
        project,
        root["agent_id"],
        "run_aggregator",
        {
            "artifact": project.ctx.get("artifact", {}),
            "port": root["port"],
            "address": root["address"],
            "rounds": tc.training_cycles,
            "min_available_clients": n,
            "min_fit_clients": n,
            "min_evaluate_clients": n,
            # The root averages cluster models weighted by their examples; the SLA's strategy runs in clusters.
            "strategy": Strategy.FEDAVG.value,
            "strategy_params": {},
            "learners": n,
            "supernode_keys": [],
            **timeouts,
            # Only the root logs to MLflow (one run per cycle); cluster aggregators and learners never do.
            "tracking": aggregator_spec(project, unit="cycle"),
            # Whose registry namespace its model files go to where they must leave its container (Oakestra).
            "customer": project.record.customer,
            **project.sla.actor_resources(),
        },
    )
    commands: dict[str, str] = {}
    for cluster, seat in clusters.items():
        command_id = ctx.command(
            project,
            seat["agent_id"],
            "run_aggregator",
            {
                "artifact": project.ctx.get("artifact", {}),
                "port": seat["port"],
                "address": seat["address"],
                "cluster": cluster,
                "root_address": root["address"],
                "rounds": tc.training_rounds,
                "min_available_clients": tc.min_available_clients,
                "min_fit_clients": tc.min_fit_clients,
                "min_evaluate_clients": tc.min_evaluate_clients,
                "strategy": tc.strategy.value,
                "strategy_params": tc.strategy_settings(),
                "learners": len(seat["learners"]),
                "supernode_keys": [keys[a] for a in sorted(seat["learners"]) if a in keys],
                **timeouts,
                **project.sla.actor_resources(),
            },
        )
        commands[command_id] = cluster
    project.ctx["cluster_commands"] = commands
    project.ctx["progress"] = {
        "round": 0,
        "rounds": tc.training_cycles * tc.training_rounds,
        "cycle": 0,
        "cycles": tc.training_cycles,
        "clusters": {c: {"cycle": 0, "round": 0, "rounds": tc.training_rounds} for c in clusters},
    }
    project.ctx["critical_agents"] = sorted({root["agent_id"], *(s["agent_id"] for s in clusters.values())})


def _cluster_of_learner(project: Project, agent_id: str) -> str | None:
    for cluster, seat in project.ctx.get("clusters", {}).items():
        if agent_id in seat["learners"]:
            return str(cluster)
    return None


def learner_lost(project: Project, agent_id: str, reason: str, ctx: StageContext) -> Decision:
    """A learner is gone for good: its cluster fails when it drops below the per-cluster minimum."""
    tc = project.sla.training_configuration
    cluster = _cluster_of_learner(project, agent_id)
    lost: list[str] = project.ctx.setdefault("learners_lost", [])
    if agent_id not in lost:
        lost.append(agent_id)
        lost.sort()
    members = project.ctx["clusters"][cluster]["learners"] if cluster else []
    left = len([a for a in members if a not in lost])
    need = max(tc.min_available_clients, tc.min_fit_clients, tc.min_evaluate_clients)
    if left < need:
        return Decision.fail(
            f"cluster {cluster} failed: learner on {agent_id} failed: {reason}; {left} learner(s) left in cluster "
            f"{cluster}, fewer than the {need} its rounds need"
        )
    ctx.event(project, "warning", f"cluster {cluster}: learner on {agent_id} failed: {reason}; {left} left")
    return Decision.accept()


def on_aggregation_report(project: Project, report: ReportBase, ctx: StageContext) -> Decision | None:
    """Reports of the root and the cluster aggregators; None for what the classic handling decides."""
    root_id = project.ctx.get("aggregator_command_id")
    clusters: dict[str, str] = project.ctx.get("cluster_commands", {})
    progress = project.ctx.setdefault("progress", {})
    tc = project.sla.training_configuration
    cluster = clusters.get(report.command_id or "")
    if isinstance(report, AggregatorStarted) and cluster is not None:
        project.ctx["clusters"][cluster]["address"] = report.address
        ctx.event(project, "report.accepted", f"cluster {cluster} aggregator listening on {report.address}")
        return Decision.accept()
    if isinstance(report, AggregatorStarted) and report.command_id == root_id:
        project.ctx["aggregator"]["address"] = report.address
        ctx.event(project, "report.accepted", f"root aggregator listening on {report.address}")
        return Decision.accept()
    if isinstance(report, RoundCompleted) and cluster is not None:
        cycle = report.cycle or 1
        mine = progress.setdefault("clusters", {}).setdefault(cluster, {"rounds": tc.training_rounds})
        if (cycle, report.round) > (mine.get("cycle", 0), mine.get("round", 0)):
            mine.update(cycle=cycle, round=report.round, loss=report.loss, accuracy=report.accuracy)
            done = (cycle - 1) * tc.training_rounds + report.round
            progress["round"] = max(progress.get("round", 0), done)
        ctx.event(
            project,
            "round.completed",
            f"cycle {cycle}/{tc.training_cycles} cluster {cluster} round {report.round}/{tc.training_rounds}: "
            f"loss {report.loss} accuracy {report.accuracy}",
            **report.model_dump(include={"round", "loss", "accuracy", "examples", "duration_s", "drift", "cycle"}),
            cluster=cluster,
            level="cluster",
        )
        return Decision.accept()
    if isinstance(report, RoundCompleted) and report.command_id == root_id:
        if report.round > progress.get("cycle", 0):
            progress.update(cycle=report.round, loss=report.loss, accuracy=report.accuracy)
        ctx.event(
            project,
            "round.completed",
            f"cycle {report.round}/{tc.training_cycles}: global model loss {report.loss} accuracy {report.accuracy}",
            cycle=report.round,
            level="root",
            **report.model_dump(include={"loss", "accuracy", "examples", "duration_s"}),
        )
        return Decision.accept()
    if isinstance(report, TrainingFailed | CommandFailed) and cluster is not None:
        tail = f"\n{report.log_tail}" if report.log_tail else ""
        return Decision.fail(f"cluster {cluster} failed: its aggregator: {report.reason}{tail}")
    if isinstance(report, TrainingFailed | CommandFailed) and report.command_id == root_id:
        tail = f"\n{report.log_tail}" if report.log_tail else ""
        return Decision.fail(f"root aggregator failed: {report.reason}{tail}")
    if isinstance(report, TrainingSucceeded) and cluster is not None:
        return Decision.ignore("a cluster aggregator does not finish the training")
    if isinstance(report, LearnerFailed) and report.command_id in project.ctx.get("learners", {}).values():
        return learner_lost(project, report.agent_id, report.reason, ctx)
    if isinstance(report, LearnerReady):
        return Decision.ignore("learner.ready after aggregation started")
    return None
