"""A fleet with every part real, for tests that run whole projects: a manager process, three ``flops agent``
processes (node-0 builds, aggregates and serves; node-1 and node-2 only learn), scikit-learn's digits pushed
to them as three IID partitions over Arrow Flight, and the example ML repo as a git repository."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flops import topics
from flops.broker import MosquittoBroker
from flops.bus import Bus, BusOptions
from flops.data.ops import mock
from flops.demo import EXAMPLE_SLA, example_repo
from flops.messages import ProjectState, new_id
from flops.settings import BrokerAddress
from tests.base_support import ProjectFeed, free_port_range, wait_no_processes
from tests.support import AgentProc, ManagerProcess

LEARNERS = ("node-0", "node-1", "node-2")
PROJECT_TIMEOUT = 120.0
CLEANUP_TIMEOUT = 40.0  # stop_project is asynchronous: SIGTERM, a grace period, then SIGKILL


class RestartableBroker:
    """Mosquitto on a fixed port, without persistence, that is stopped by a signal (SIGTERM: it publishes every
    client's last will; SIGKILL: nothing) and started again empty, losing every session and retained message."""

    def __init__(self) -> None:
        self._broker = MosquittoBroker()
        self.port = self._broker.port

    @property
    def address(self) -> BrokerAddress:
        return self._broker.address

    def down(self, sig: signal.Signals) -> None:
        os.kill(self._broker.pid, sig)
        self._broker.wait()
        self._broker.stop()

    def up(self) -> None:
        self._broker = MosquittoBroker(port=self.port)

    def restart(self, sig: signal.Signals, downtime: float) -> None:
        self.down(sig)
        time.sleep(downtime)  # the outage itself, not a synchronisation
        self.up()

    def stop(self) -> None:
        self._broker.stop()


@dataclass
class Fleet:
    broker: BrokerAddress
    tmp: Path
    feed: ProjectFeed
    manager: ManagerProcess
    agents: dict[str, AgentProc]
    rows: dict[str, int]  # rows of digits pushed to each agent
    repo_url: str
    extra_agents: list[AgentProc] = field(default_factory=list)

    def sla(self, repo_url: str | None = None, *, post_training: bool = False, **training: Any) -> dict[str, Any]:
        """The demo's project request (examples/projects/digits.json) for this fleet."""
        body = json.loads(EXAMPLE_SLA.read_text())
        body["ml_repo_url"] = repo_url or self.repo_url
        tc = body["training_configuration"]
        tc.update(min_available_clients=3, min_fit_clients=3, min_evaluate_clients=3)
        deadlines = training.pop("deadlines", None)
        tc.update(training)
        if deadlines:
            body["deadlines"] = deadlines
        if not post_training:
            body["post_training_steps"] = []
        return body

    def run(self, body: dict[str, Any], timeout: float = PROJECT_TIMEOUT) -> tuple[str, ProjectState]:
        project_id = self.feed.submit(body)
        return project_id, self.feed.wait_finished(project_id, timeout)

    def work_dir(self, agent_id: str, project_id: str, command_id: str) -> Path:
        return self.agents[agent_id].home / "work" / project_id / command_id


@contextlib.contextmanager
def running_fleet(
    broker: BrokerAddress,
    tmp: Path,
    manager_env: dict[str, str] | None = None,
    *,
    agent_env: dict[str, dict[str, str]] | None = None,
    repo_url: str | None = None,
) -> Iterator[Fleet]:
    """Start the fleet, push the data, yield; stop everything and check nothing of any project still runs.
    ``agent_env`` adds to an agent's environment by agent id."""
    feed = ProjectFeed(broker)
    env = {"FLOPS_AGGREGATOR_PORTS": json.dumps(free_port_range()), **(manager_env or {})}
    manager = ManagerProcess(broker, tmp / "manager", env)
    agents = {
        agent_id: AgentProc(
            agent_id,
            tmp / "agents" / agent_id,
            "learner,builder,aggregator,serve" if i == 0 else "learner",
            broker,
            env=(agent_env or {}).get(agent_id, {}),
        )
        for i, agent_id in enumerate(LEARNERS)
    }
    fleet = Fleet(broker, tmp, feed, manager, agents, {}, repo_url or example_repo(tmp))
    try:
        manager.start()
        for agent in agents.values():
            agent.start()
        statuses = feed.wait_agents(list(LEARNERS))
        pushed = mock(
            "digits",
            len(LEARNERS),
            "digits",
            [statuses[a].data_server for a in LEARNERS],
            tokens=[agents[a].data_token() for a in LEARNERS],
        )
        fleet.rows = {a: row["rows"] for a, row in zip(LEARNERS, pushed, strict=True)}
        feed.wait_agents(list(LEARNERS), tag="digits")
        yield fleet
    finally:
        for agent in [*fleet.extra_agents, *agents.values()]:
            agent.stop()
        manager.stop()
        with contextlib.suppress(Exception):
            clear_retained(broker, [a.agent_id for a in [*fleet.extra_agents, *agents.values()]])
        feed.close()
    # With its agents stopped, nothing of any project runs any more, model servers included.
    for project_id in list(feed.projects):
        wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def clear_retained(broker: BrokerAddress, agent_ids: list[str]) -> None:
    """Remove our agents' retained statuses so later test modules start with an empty fleet."""
    with Bus(broker, BusOptions(client_id=new_id("test-clear"))) as bus:
        for agent_id in agent_ids:
            bus.publish_wait(topics.agent_status(agent_id), b"", retain=True)
