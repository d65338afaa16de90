"""Clustered hierarchical FL with every part real: a Mosquitto broker, the manager as a process, a root agent
(builds, aggregates, serves; no cluster) and four learner agents in two clusters (``--cluster east`` /
``west``, two each), scikit-learn's digits pushed as four IID partitions, real builds and real Flower at both
levels. The original ``hierarchical_mnist_sklearn_small`` semantics (2 cycles x 3 rounds, 2 learners per
cluster, both post-training steps) run to completion; failures end in the documented terminal state with
nothing left running."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flops.data.ops import mock
from flops.demo import example_repo
from flops.messages import ProjectState
from flops.settings import BrokerAddress
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
        yield HFleet(feed, agents, example_repo(tmp))
    finally:
        for agent in agents.values():
            agent.stop()
        manager.stop()
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
    assert len(wait_no_processes(project_id, allow=("flops.runtime.serve",), timeout=CLEANUP_TIMEOUT)) == 1


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
