"""Clustered hierarchical FL with every part real: a Mosquitto broker, the manager as a process, a root agent
(builds, aggregates, serves; no cluster) and four learner agents in two clusters (``--cluster east`` /
``west``, two each), scikit-learn's digits pushed as four IID partitions, real builds and real Flower at both
levels. The original ``hierarchical_mnist_sklearn_small`` semantics (2 cycles x 3 rounds, 2 learners per
cluster, both post-training steps) run to completion; failures end in the documented terminal state with
nothing left running. The manager tracks every project in MLflow (``flops tracking`` on loopback, when the
tracking extra is installed): the root aggregator logs one run per cycle, and the web view draws each
cluster's rounds."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flops.broker import free_port
from flops.data.ops import mock
from flops.demo import example_repo
from flops.messages import ProjectState
from flops.settings import BrokerAddress
from flops.tracking.project import experiment_name
from flops.tracking.server import TrackingServer, start_tracking
from tests.base_support import (
    ProjectFeed,
    example_model,
    free_port_range,
    held_out_digits,
    project_processes,
    wait_no_processes,
)
from tests.fleet_support import CLEANUP_TIMEOUT, clear_retained
from tests.support import AgentProc, ManagerProcess, wait_until
from tests.ui.support import UiProc

ROOT = Path(__file__).resolve().parents[1]
HIERARCHICAL_SLA = ROOT / "examples" / "projects" / "digits_hierarchical.json"
LEARNERS = {"east-0": "east", "east-1": "east", "west-0": "west", "west-1": "west"}
TIMEOUT = 420.0
# Failure tests: 2 cycles x 1 round, one learner per cluster (fewer processes on a 2-core machine).
SHORT = {"training_rounds": 1, "min_available_clients": 1, "min_fit_clients": 1, "min_evaluate_clients": 1}
FIRST_TIMEOUT = 600.0  # includes a cold build


@dataclass
class HFleet:
    feed: ProjectFeed
    agents: dict[str, AgentProc]
    repo_url: str
    broker: BrokerAddress
    tmp: Path
    tracking: TrackingServer | None

    def sla(self, **training: Any) -> dict[str, Any]:
        body = json.loads(HIERARCHICAL_SLA.read_text())
        body["ml_repo_url"] = self.repo_url
        body["post_training_steps"] = training.pop("post_training_steps", [])
        body["training_configuration"].update(training)
        return body

    def run(self, body: dict[str, Any], timeout: float = TIMEOUT) -> tuple[str, ProjectState]:
        project_id = self.feed.submit(body)
        return project_id, self.feed.wait_finished(project_id, timeout)

    def root_model(self, project_id: str) -> Path:
        (root,) = [c for c in self.feed.commands(project_id, "run_aggregator") if "cluster" not in c.spec]
        return self.agents["root"].home / "work" / project_id / root.command_id / "model" / "model.npz"


@pytest.fixture(scope="module")
def hfleet(broker: BrokerAddress, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HFleet]:
    tmp = tmp_path_factory.mktemp("hierarchical")
    feed = ProjectFeed(broker)
    env = {"FLOPS_AGGREGATOR_PORTS": json.dumps(free_port_range()), "FLOPS_AGENT_GRACE_S": "3"}
    tracking = start_tracking(tmp / "mlflow", port=free_port()) if importlib.util.find_spec("mlflow") else None
    if tracking is not None:
        env["FLOPS_TRACKING_URI"] = tracking.url
    manager = ManagerProcess(broker, tmp / "manager", env)
    agents = {"root": AgentProc("root", tmp / "agents" / "root", "builder,aggregator,serve", broker)}
    for agent_id, cluster in LEARNERS.items():
        agents[agent_id] = AgentProc(agent_id, tmp / "agents" / agent_id, "learner", broker, cluster=cluster)
    try:
        manager.start()
        for agent in agents.values():
            agent.start()
        agents["root"].wait_online()
        statuses = feed.wait_agents(list(LEARNERS))
        mock(
            "digits",
            len(LEARNERS),
            "digits",
            [statuses[a].data_server for a in LEARNERS],
            tokens=[agents[a].data_token() for a in LEARNERS],
        )
        feed.wait_agents(list(LEARNERS), tag="digits")
        yield HFleet(feed, agents, example_repo(tmp), broker, tmp, tracking)
    finally:
        for agent in agents.values():
            agent.stop()
        manager.stop()
        if tracking is not None:
            tracking.stop()
        with contextlib.suppress(Exception):
            clear_retained(broker, list(agents))
        feed.close()
    for project_id in list(feed.projects):
        wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def _outcome(fleet: HFleet, project_id: str, state: ProjectState) -> str:
    assert state.outcome is not None, state
    if state.outcome.value != "completed":
        print("\n".join(fleet.feed.messages(project_id)))
    return state.outcome.value


def _accuracy(model_npz: Path) -> float:
    x_test, y_test = held_out_digits()
    return float((example_model(model_npz).predict(x_test) == y_test).mean())


@pytest.mark.timeout(1200)
def test_small_original_semantics_complete_and_match_classic_accuracy(hfleet: HFleet) -> None:
    feed = hfleet.feed
    project_id, state = hfleet.run(
        hfleet.sla(post_training_steps=["build_image_for_trained_model", "deploy_trained_model_image"]),
        FIRST_TIMEOUT,
    )
    assert _outcome(hfleet, project_id, state) == "completed", state.reason
    rounds = feed.events(project_id, "round.completed")
    cycles = [e.data["cycle"] for e in rounds if e.data.get("level") == "root"]
    assert cycles == [1, 2]
    for cluster in ("east", "west"):
        got = [(e.data["cycle"], e.data["round"]) for e in rounds if e.data.get("cluster") == cluster]
        assert got == [(c, r) for c in (1, 2) for r in (1, 2, 3)], (cluster, got)
    assert any(e.message.startswith("cycle 2/2 cluster west round 3/3") for e in rounds)
    assert (state.progress.cycle, state.progress.cycles, state.progress.round, state.progress.rounds) == (2, 2, 6, 6)
    assert sorted(state.progress.clusters) == ["east", "west"]
    assert state.model_url
    # Each learner ran against its own cluster's aggregator.
    learners = feed.commands(project_id, "run_learner")
    assert {c.agent_id: c.spec["cluster"] for c in learners} == LEARNERS
    hierarchical = _accuracy(hfleet.root_model(project_id))

    # Classic mode, same fleet, same total learner rounds (2 x 3), all four learners.
    classic_body = hfleet.sla()
    classic_body["training_configuration"].update(
        mode="classic", training_cycles=1, training_rounds=6, min_available_clients=4, min_fit_clients=4,
        min_evaluate_clients=4,
    )  # fmt: skip
    classic_id, classic_state = hfleet.run(classic_body)
    assert _outcome(hfleet, classic_id, classic_state) == "completed", classic_state.reason
    classic = _accuracy(hfleet.root_model(classic_id))
    print(f"\nheld-out accuracy: hierarchical 2x3 {hierarchical:.4f}, classic 6 rounds {classic:.4f}")
    assert hierarchical >= 0.85
    assert abs(hierarchical - classic) <= 0.02
    wait_no_processes(classic_id, timeout=CLEANUP_TIMEOUT)
    # The model server stays: MLflow's scoring server when the fleet is tracked (the logged model), ours if not.
    server = "flops.runtime.mlflow_serve" if hfleet.tracking is not None else "flops.runtime.serve"
    assert len(wait_no_processes(project_id, allow=(server,), timeout=CLEANUP_TIMEOUT)) == 1


@pytest.mark.timeout(900)
def test_tracked_root_logs_a_run_per_cycle_and_the_view_draws_each_cluster(
    hfleet: HFleet,
    page: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if hfleet.tracking is None:
        pytest.skip("the tracking extra installs mlflow-skinny")
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", hfleet.tracking.url)  # where models:/ URIs resolve
    ui = UiProc(hfleet.tmp / "ui", {"FLOPS_BROKER_URL": hfleet.broker.url})
    ui.home.mkdir(exist_ok=True)
    ui.start()  # before the project: events are not retained
    try:
        project_id, state = hfleet.run(hfleet.sla(**SHORT), FIRST_TIMEOUT)
        assert _outcome(hfleet, project_id, state) == "completed", state.reason
        roots = [e.data for e in hfleet.feed.events(project_id, "round.completed") if e.data.get("level") == "root"]
        assert [c["cycle"] for c in roots] == [1, 2]

        # MLflow: one run per cycle (the root's), metrics as the cycle events, the best model registered.
        client = mlflow.MlflowClient(tracking_uri=hfleet.tracking.url, registry_uri=hfleet.tracking.url)
        experiment = client.get_experiment_by_name(experiment_name(project_id))
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        by_cycle = {int(r.data.tags["flops.cycle"]): r for r in runs}
        assert len(runs) == 2 and sorted(by_cycle) == [1, 2]
        for event in roots:
            run = by_cycle[event["cycle"]]
            assert run.info.run_name == f"cycle-{event['cycle']}" and run.data.tags["flops.kind"] == "cycle"
            assert run.data.metrics["loss"] == pytest.approx(event["loss"])
            assert run.data.metrics["accuracy"] == pytest.approx(event["accuracy"])
            assert run.data.metrics["examples"] == event["examples"]
            assert run.data.params["strategy"] == "fedavg" and run.data.params["rounds"] == "2"
        tracked = state.tracking
        assert tracked is not None and not tracked.get("warnings"), tracked
        assert tracked["run_ids"] == {str(k): r.info.run_id for k, r in by_cycle.items()}
        versions = client.search_model_versions(f"name = 'flops-{project_id}'")
        assert [v.version for v in versions] == ["1"] and tracked["model_version"] == "1"
        assert tracked["run_id"] in {r.info.run_id for r in runs}
        assert mlflow.sklearn.load_model(f"models:/flops-{project_id}/1") is not None

        # The web view: one series per cluster, every cluster round and cycle in its table.
        with urllib.request.urlopen(f"{ui.url}/api/projects/{project_id}", timeout=10) as response:
            shown = json.loads(response.read())["hierarchical"]
        assert sorted(shown["clusters_seen"]) == ["east", "west"]
        for points in shown["clusters_seen"].values():
            assert [(p["cycle"], p["round"], p["step"]) for p in points] == [(1, 1, 1), (2, 1, 2)]
        page.goto(f"{ui.url}/projects/{project_id}")
        page.wait_for_selector("#plot g.series[data-cluster='west'] circle", timeout=20_000)
        for cluster in ("east", "west"):
            assert page.locator(f"#plot g.series[data-cluster='{cluster}'] circle").count() == 4  # 2 x acc + loss
            assert page.locator(f".legend .key[data-cluster='{cluster}']").inner_text().strip() == f"cluster {cluster}"
        assert page.locator("#plot rect.root").count() == 2
        assert page.locator("#rounds tbody tr").count() == 6  # 2 clusters x 2 cycles + 2 global models
    finally:
        ui.stop()
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def test_a_cluster_below_its_minimum_is_refused_by_name(hfleet: HFleet, broker: BrokerAddress, tmp_path: Path) -> None:
    north = AgentProc("north-0", tmp_path / "north-0", "learner", broker, cluster="north").start()
    try:
        statuses = hfleet.feed.wait_agents(["north-0"])
        mock("digits", 1, "digits", [statuses["north-0"].data_server], tokens=[north.data_token()])
        hfleet.feed.wait_agents(["north-0"], tag="digits")
        project_id, state = hfleet.run(hfleet.sla())
    finally:
        north.stop()
        clear_retained(broker, ["north-0"])
    assert _outcome(hfleet, project_id, state) == "failed"
    assert state.failed_stage is not None and state.failed_stage.value == "learners"
    assert state.reason is not None and "cluster north has 1 of 2" in state.reason, state.reason
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def _one_process(project_id: str, needles: tuple[str, ...], without: str | None) -> int:
    """The pid of the one process of the project whose command line holds every needle (and not ``without``)."""

    def match() -> int | None:
        hits = [
            p
            for p in project_processes(project_id)
            if all(n in p.cmdline for n in needles) and (without is None or without not in p.cmdline)
        ]
        return hits[0].pid if len(hits) == 1 else None

    return int(wait_until(match, 30.0, f"one process of {project_id} matching {needles}"))


def _kill_mid_cycle(
    hfleet: HFleet, needles: tuple[str, ...], without: str | None, cycle: int = 1
) -> tuple[str, ProjectState]:
    """Start a SHORT project, wait for a cluster round of ``cycle``, SIGKILL the one matching process."""
    feed = hfleet.feed
    project_id = feed.submit(hfleet.sla(**SHORT))
    feed.wait_event(
        project_id,
        lambda e: e.kind == "round.completed" and e.data.get("cycle") == cycle and e.data.get("level") == "cluster",
        TIMEOUT,
        f"a cluster round of cycle {cycle}",
    )
    os.kill(_one_process(project_id, needles, without), signal.SIGKILL)
    return project_id, feed.wait_finished(project_id, TIMEOUT)


@pytest.mark.parametrize(
    ("needles", "without", "reason"),
    [
        (("-m flops.runtime.learner", "/agents/west-"), None, "cluster west failed"),
        (("-m flops.runtime.aggregator", "--cluster east"), None, "cluster east failed"),
        (("-m flops.runtime.aggregator",), "--cluster", "root aggregator failed"),
    ],
    ids=["learner", "cluster-aggregator", "root-aggregator"],
)
def test_a_killed_process_fails_the_project_naming_its_level(
    hfleet: HFleet, needles: tuple[str, ...], without: str | None, reason: str
) -> None:
    project_id, state = _kill_mid_cycle(hfleet, needles, without)
    assert _outcome(hfleet, project_id, state) == "failed"
    assert state.failed_stage is not None and state.failed_stage.value == "aggregation"
    assert state.reason is not None and state.reason.startswith(reason), state.reason
    assert wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT) == []


def test_cancel_during_cycle_2_stops_every_level(hfleet: HFleet) -> None:
    feed = hfleet.feed
    project_id = feed.submit(hfleet.sla(**SHORT))
    feed.wait_event(
        project_id,
        lambda e: e.kind == "round.completed" and e.data.get("cycle") == 2 and e.data.get("level") == "cluster",
        TIMEOUT,
        "a cluster round of cycle 2",
    )
    from flops.client import Client

    with Client(feed.address) as client:
        client.cancel(project_id, reason="enough")
    state = feed.wait_finished(project_id, 60)
    assert _outcome(hfleet, project_id, state) == "cancelled"
    assert wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT) == []


def test_hierarchical_example_sla_validates_like_the_original_small_one() -> None:
    from flops.sla import ProjectSLA

    sla = ProjectSLA.model_validate_json(HIERARCHICAL_SLA.read_bytes())
    tc = sla.training_configuration
    assert (tc.mode.value, tc.training_cycles, tc.training_rounds) == ("hierarchical", 2, 3)
    assert tc.min_available_clients == 2
    assert len(sla.post_training_steps) == 2
