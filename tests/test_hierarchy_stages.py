"""Clustered hierarchical FL in the manager's stages (engine level, fake clock): which clusters take part,
the commands for the root and each cluster aggregator, cycle and per-cluster progress, and failures naming
the cluster. (With every part real: ``tests/test_hierarchical.py``.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flops.lifecycle_stages import Stage
from flops.messages import AgentStatus
from tests.engine_support import COMMIT, EngineHarness, sla_body


@pytest.fixture
def h(tmp_path: Path) -> EngineHarness:
    return EngineHarness(tmp_path)


def _agent(h: EngineHarness, agent_id: str, roles: tuple[str, ...], cluster: str | None, tags: bool = True) -> None:
    status = AgentStatus(
        agent_id=agent_id,
        online=True,
        roles=list(roles),  # type: ignore[arg-type]
        data_tags={"digits": 100} if tags else {},
        cluster=cluster,
        ts=h.clock(),
    )
    h._keep(h.engine.agent_status(agent_id, status.to_bytes()))


def _fleet(h: EngineHarness, per_cluster: dict[str, int]) -> None:
    _agent(h, "builder-1", ("builder",), None, tags=False)
    _agent(h, "root-1", ("aggregator", "serve"), None, tags=False)
    for cluster, n in per_cluster.items():
        for i in range(n):
            _agent(h, f"{cluster}-learner-{i}", ("learner",), cluster)


def _body(**training: Any) -> dict[str, Any]:
    body = sla_body(learners=2, rounds=3, steps=())
    body["training_configuration"].update(mode="hierarchical", training_cycles=2, **training)
    return body


def _to_learners(h: EngineHarness, body: dict[str, Any]) -> str:
    project_id = h.submit(body)
    h.resolve(project_id)
    cmd = h.command(project_id, "build")
    h.report(cmd, "build.succeeded", artifact={"ref": "env://x", "commit": COMMIT})
    return project_id


def _ready(h: EngineHarness, project_id: str) -> None:
    for cmd in h.commands(project_id, "run_learner"):
        h.report(cmd, "learner.ready", agent_id=cmd.agent_id, examples=100)


def test_a_cluster_below_its_minimum_at_learners_entry_is_refused_by_name(h: EngineHarness) -> None:
    _fleet(h, {"east": 2, "west": 1})
    project_id = _to_learners(h, _body())
    state = h.state(project_id)
    assert state.failed_stage is Stage.LEARNERS, state
    assert state.reason is not None and "cluster west has 1 of 2" in state.reason, state.reason
    assert "min_clusters" in state.reason
    assert h.commands(project_id, "run_learner") == []


def test_min_clusters_leaves_a_short_cluster_out_and_says_so(h: EngineHarness) -> None:
    _fleet(h, {"east": 2, "west": 1})
    project_id = _to_learners(h, _body(min_clusters=1))
    assert h.stage(project_id) is Stage.LEARNERS
    learners = sorted(c.agent_id for c in h.commands(project_id, "run_learner"))
    assert learners == ["east-learner-0", "east-learner-1"]
    assert any("left out: cluster west has 1 of 2" in e.message for e in h.events(project_id))


def test_preparation_waits_for_min_clusters_qualifying_clusters(h: EngineHarness) -> None:
    _fleet(h, {"east": 2, "west": 1})
    project_id = h.submit(_body(min_clusters=2))
    h.resolve(project_id)
    assert h.stage(project_id) is Stage.PREPARATION
    assert any("1 of 2 clusters with 2 online learners" in e.message for e in h.events(project_id))
    _agent(h, "west-learner-1", ("learner",), "west")
    assert h.stage(project_id) is Stage.BUILDER


def test_min_clusters_is_refused_in_classic_mode() -> None:
    from pydantic import ValidationError

    from flops.sla import ProjectSLA

    body = sla_body()
    body["training_configuration"]["min_clusters"] = 1
    with pytest.raises(ValidationError, match="min_clusters applies to hierarchical mode only"):
        ProjectSLA.model_validate(body)


def _to_aggregation(h: EngineHarness) -> str:
    _fleet(h, {"east": 2, "west": 2})
    project_id = _to_learners(h, _body(strategy="fedprox"))
    learners = h.commands(project_id, "run_learner")
    by_cluster = {c.spec["cluster"]: set() for c in learners}
    for cmd in learners:
        by_cluster[cmd.spec["cluster"]].add(cmd.spec["aggregator_address"])
    assert {k: len(v) for k, v in by_cluster.items()} == {"east": 1, "west": 1}
    h.report(learners[0], "learner.ready", agent_id=learners[0].agent_id, examples=100)
    h.report(learners[1], "learner.ready", agent_id=learners[1].agent_id, examples=100)
    assert h.stage(project_id) is Stage.LEARNERS  # waits for every chosen cluster's learners
    _ready(h, project_id)
    assert h.stage(project_id) is Stage.AGGREGATION
    return project_id


def test_aggregation_starts_a_root_and_one_aggregator_per_cluster(h: EngineHarness) -> None:
    project_id = _to_aggregation(h)
    aggregators = h.commands(project_id, "run_aggregator")
    root = next(c for c in aggregators if "cluster" not in c.spec)
    clusters = {c.spec["cluster"]: c for c in aggregators if "cluster" in c.spec}
    assert sorted(clusters) == ["east", "west"]
    assert (root.spec["rounds"], root.spec["min_fit_clients"], root.spec["strategy"]) == (2, 2, "fedavg")
    for cmd in clusters.values():
        assert cmd.spec["root_address"] == root.spec["address"]
        assert (cmd.spec["rounds"], cmd.spec["min_fit_clients"], cmd.spec["strategy"]) == (3, 2, "fedprox")
        assert cmd.spec["strategy_params"] == {"proximal_mu": 0.1}
    ports = [root.spec["port"], *(c.spec["port"] for c in clusters.values())]
    assert len(set(ports)) == 3  # one agent may host several aggregators


def test_aggregators_on_different_agents_of_one_host_network_never_share_a_port(h: EngineHarness) -> None:
    """As Oakestra seats: an aggregator agent in each cluster and none without, so the root shares one with its
    cluster; containers on one host network (the fake Oakestra) would collide on a port used twice."""
    _agent(h, "builder-1", ("builder",), None, tags=False)
    for cluster in ("east", "west"):
        _agent(h, f"{cluster}-agg", ("aggregator", "serve"), cluster, tags=False)
        for i in range(2):
            _agent(h, f"{cluster}-learner-{i}", ("learner",), cluster)
    project_id = _to_learners(h, _body())
    _ready(h, project_id)

    aggregators = h.commands(project_id, "run_aggregator")
    placed = sorted((c.agent_id, c.spec.get("cluster", "root")) for c in aggregators)
    assert placed == [("east-agg", "east"), ("east-agg", "root"), ("west-agg", "west")]
    assert len({c.spec["port"] for c in aggregators}) == 3


def test_with_tracking_only_the_root_aggregator_gets_a_tracking_spec(tmp_path: Path) -> None:
    h = EngineHarness(tmp_path, tracking_uri="http://127.0.0.1:5005")
    project_id = _to_aggregation(h)
    aggregators = h.commands(project_id, "run_aggregator")
    (root,) = [c for c in aggregators if "cluster" not in c.spec]
    assert root.spec["tracking"] == {
        "url": "http://127.0.0.1:5005",
        "experiment": f"FLOps Project {project_id}",
        "project_id": project_id,
        "flavor": "sklearn",
        "registered_model": f"flops-{project_id}",
        "unit": "cycle",
    }
    others = [c for c in aggregators if "cluster" in c.spec] + h.commands(project_id, "run_learner")
    assert len(others) == 6 and not any(c.spec.get("tracking") for c in others)
    h.report(root, "tracking.logged", round=1, run_id="run-1")
    assert h.state(project_id).tracking["run_ids"] == {"1": "run-1"}
    assert any(e.message == "cycle 1 logged to MLflow run run-1" for e in h.events(project_id))


def test_cycles_and_cluster_rounds_become_events_and_progress(h: EngineHarness) -> None:
    project_id = _to_aggregation(h)
    aggregators = h.commands(project_id, "run_aggregator")
    root = next(c for c in aggregators if "cluster" not in c.spec)
    clusters = {c.spec["cluster"]: c for c in aggregators if "cluster" in c.spec}
    for cycle in (1, 2):
        for name, cmd in clusters.items():
            for rnd in (1, 2, 3):
                h.report(cmd, "round.completed", round=rnd, loss=1.0 / rnd, accuracy=0.8, cycle=cycle, cluster=name)
        h.report(root, "round.completed", round=cycle, loss=0.3, accuracy=0.9, examples=300)
        state = h.state(project_id)
        assert (state.progress.cycle, state.progress.cycles) == (cycle, 2)
        assert state.progress.clusters["east"].cycle == cycle and state.progress.clusters["east"].round == 3
    messages = [e.message for e in h.events(project_id)]
    assert any(m.startswith("cycle 2/2 cluster west round 3/3") for m in messages), messages
    assert any(m.startswith("cycle 2/2: global model") for m in messages), messages
    levels = {e.data.get("level") for e in h.events(project_id) if e.kind == "round.completed"}
    assert levels == {"root", "cluster"}
    assert h.state(project_id).progress.round == 6
    h.report(root, "training.succeeded", best_round=2, loss=0.3, accuracy=0.9, model_ref="/m")
    assert h.stage(project_id) is Stage.FINISHED  # no post-training steps
    assert h.state(project_id).outcome is not None and h.state(project_id).outcome.value == "completed"


@pytest.mark.parametrize("which", ["cluster", "root"])
def test_a_failed_aggregator_fails_the_project_naming_its_level(h: EngineHarness, which: str) -> None:
    project_id = _to_aggregation(h)
    aggregators = h.commands(project_id, "run_aggregator")
    cmd = next(c for c in aggregators if ("cluster" in c.spec) == (which == "cluster"))
    h.report(cmd, "training.failed", reason="killed")
    state = h.state(project_id)
    assert state.failed_stage is Stage.AGGREGATION
    expected = f"cluster {cmd.spec['cluster']} failed" if which == "cluster" else "root aggregator failed"
    assert state.reason is not None and state.reason.startswith(expected), state.reason
    stopped = {c.agent_id for c in h.commands(project_id, "stop_project")}
    assert stopped >= {"root-1", "east-learner-0", "east-learner-1", "west-learner-0", "west-learner-1"}


def test_a_learner_lost_fails_its_cluster_by_name(h: EngineHarness) -> None:
    project_id = _to_aggregation(h)
    learner = next(c for c in h.commands(project_id, "run_learner") if c.spec["cluster"] == "west")
    h.report(learner, "learner.failed", agent_id=learner.agent_id, reason="killed")
    state = h.state(project_id)
    assert state.reason is not None and state.reason.startswith("cluster west failed"), state.reason


def test_watch_prints_the_cycle_and_every_cluster(h: EngineHarness) -> None:
    from rich.console import Console

    from flops.cli import _print_state

    project_id = _to_aggregation(h)
    aggregators = h.commands(project_id, "run_aggregator")
    root = next(c for c in aggregators if "cluster" not in c.spec)
    east = next(c for c in aggregators if c.spec.get("cluster") == "east")
    h.report(east, "round.completed", round=2, loss=0.4, accuracy=0.81, cycle=1, cluster="east")
    h.report(root, "round.completed", round=1, loss=0.3, accuracy=0.9, examples=300)
    console = Console(record=True, width=200)
    _print_state(console, h.state(project_id))
    text = console.export_text()
    assert "cycle 1/2  loss 0.3  accuracy 0.9" in text, text
    assert "cluster east: cycle 1 round 2/3  loss 0.4  accuracy 0.81" in text, text
    assert "cluster west: cycle 0 round 0/3" in text, text
