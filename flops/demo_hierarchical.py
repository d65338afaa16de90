"""``flops demo --hierarchical``: clustered hierarchical FL on one machine.

A root agent (builds, aggregates, serves; no cluster) and four learner agents in two clusters
(``--cluster east`` / ``west``, two each) get IID partitions of digits, and the example hierarchical project
(``examples/projects/digits_hierarchical.json``, the original ``hierarchical_mnist_sklearn_small``
semantics: 2 cycles x 3 rounds, 2 learners per cluster, both post-training steps) runs with real Flower at
both levels: the root aggregator, one cluster aggregator per cluster, the learners.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from flops.demo import (
    SOURCE_ROOT,
    DemoResult,
    Fleet,
    artifacts,
    ask_model,
    example_repo,
    example_sla,
    running_system,
    stage_seconds,
    submit_and_follow,
)
from flops.messages import AgentStatus, ProjectState
from flops.settings import BrokerAddress, Settings
from flops.sla import ProjectSLA

HIERARCHICAL_SLA = SOURCE_ROOT / "examples" / "projects" / "digits_hierarchical.json"
# Agent id -> cluster label (None: the root agent, which learns nothing).
AGENTS: dict[str, str | None] = {"root": None, "east-0": "east", "east-1": "east", "west-0": "west", "west-1": "west"}


class ClusteredFleet(Fleet):
    """The root agent and four learner agents labelled with their clusters."""

    def __init__(self, work: Path, address: BrokerAddress, n: int, env: dict[str, str] | None = None) -> None:
        super().__init__(work, address, n, env)
        self.ids = list(AGENTS)
        self.learners = [a for a, cluster in AGENTS.items() if cluster is not None]

    def wait_online(self, timeout: float = 60.0) -> dict[str, AgentStatus]:
        """The learner agents online with their data servers (the root agent has none; preparation waits for
        its builder and aggregator roles)."""
        ids, self.ids = self.ids, self.learners
        try:
            return super().wait_online(timeout)
        finally:
            self.ids = ids

    def start(self) -> None:
        env = {**os.environ, "FLOPS_BROKER_URL": self.address.url, "FLOPS_LOG_FORMAT": "json", **self.env}
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        for agent_id, cluster in AGENTS.items():
            agent_dir = self.work / "agents" / agent_id
            for sub in ("data", "state", "work"):
                shutil.rmtree(agent_dir / sub, ignore_errors=True)
            roles = "builder,aggregator,serve" if cluster is None else "learner"
            argv = [sys.executable, "-m", "flops.cli", "agent", "--id", agent_id, "--data-dir", str(agent_dir)]
            argv += ["--roles", roles, *(["--cluster", cluster] if cluster else [])]
            with (self.work / "logs" / f"{agent_id}.log").open("wb") as out:
                self.procs.append(
                    subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                )


def run_hierarchical_demo(
    settings: Settings, work: Path, console: Console, *, timeout: float = 900.0, images: bool = False
) -> DemoResult:
    """The hierarchical demo; with ``images`` its artifacts are container images (registry, buildah, podman)."""
    work.mkdir(parents=True, exist_ok=True)
    with artifacts(settings, work, console, images) as (settings, agent_env):
        return _run_hierarchical_demo(settings, work, console, timeout, agent_env)


def hierarchical_sla(repo_url: str, *, post_training: bool = True, **training: int) -> ProjectSLA:
    """The example hierarchical SLA for the demo's repo; ``training`` overrides its training configuration
    (e.g. fewer rounds)."""
    body = example_sla(HIERARCHICAL_SLA, repo_url, post_training=post_training)
    body["training_configuration"].update(training)
    return ProjectSLA.model_validate(body)


def _run_hierarchical_demo(
    settings: Settings, work: Path, console: Console, timeout: float, agent_env: dict[str, str]
) -> DemoResult:
    started = time.monotonic()
    repo_url = example_repo(work)
    with running_system(settings, work, len(AGENTS), agent_env, fleet_class=ClusteredFleet) as (address, fleet):
        assert isinstance(fleet, ClusteredFleet)
        console.print(
            f"[bold]FLOps hierarchical demo[/]: broker {address.url}, manager, root agent, clusters east "
            f"(east-0, east-1) and west (west-0, west-1) ({work})"
        )
        statuses = fleet.wait_online()
        fleet.push_digits(statuses, fleet.learners, settings.tls_ca_file)
        project_id, state = submit_and_follow(address, hierarchical_sla(repo_url), console, timeout)
        if state.model_url:
            ask_model(state.model_url, console, token=state.model_token)
        print_clusters(state, console)
    total = time.monotonic() - started
    return DemoResult(project_id, state, stage_seconds(state), total, [], [])


def print_clusters(state: ProjectState, console: Console) -> None:
    p = state.progress
    console.print(f"cycle {p.cycle}/{p.cycles}: global model accuracy {p.accuracy}")
    for name, c in sorted(p.clusters.items()):
        console.print(f"  cluster {name}: cycle {c.cycle} round {c.round}/{c.rounds} accuracy {c.accuracy}")
