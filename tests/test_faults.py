"""Broker restarts with every part real: a Mosquitto broker of this module's own (so it can be stopped and
started again on the same port, without persistence, as the development broker runs), the manager as a
process, three ``flops agent`` processes and real Flower rounds. Each test breaks the broker the way an edge
site does and asserts what the user sees: the project still completes, commands still run, states are back.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.client import Client
from flops.messages import new_id
from tests.base_support import wait_no_processes
from tests.fleet_support import CLEANUP_TIMEOUT, PROJECT_TIMEOUT, Fleet, RestartableBroker, running_fleet
from tests.support import answers_ping, cli

# Long enough that the project still trains while the broker is away, short enough to keep the suite quick.
ROUNDS = 8
DOWNTIME_S = 5.0  # how long the broker stays away: part of the scenario, not a synchronisation


@pytest.fixture(scope="module")
def own_broker() -> Iterator[RestartableBroker]:
    broker = RestartableBroker()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="module")
def fleet(own_broker: RestartableBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with running_fleet(own_broker.address, tmp_path_factory.mktemp("faults")) as fleet:
        # Warm the build cache, so each test's project reaches aggregation quickly.
        project_id, state = fleet.run(fleet.sla(training_rounds=1), timeout=300)
        assert state.outcome is not None and state.outcome.value == "completed", fleet.feed.messages(project_id)
        yield fleet


def _training(fleet: Fleet, rounds: int = ROUNDS) -> str:
    """A project that is past its first round (so in aggregation, Flower running)."""
    project_id = fleet.feed.submit(fleet.sla(training_rounds=rounds))
    fleet.feed.wait_event(project_id, lambda e: e.kind == "round.completed", PROJECT_TIMEOUT, "a round.completed")
    return project_id


def _completed(fleet: Fleet, project_id: str, rounds: int = ROUNDS) -> None:
    state = fleet.feed.wait_finished(project_id, PROJECT_TIMEOUT)
    assert state.outcome is not None and state.outcome.value == "completed", (
        f"{state.outcome}: {state.reason}\n" + "\n".join(fleet.feed.messages(project_id))
    )
    # Every round reached the manager (the last one counts them all); the test's own observer may have missed
    # some events while the broker was away (events are not retained), which is no loss of the system's.
    assert state.progress.round == rounds and state.progress.rounds == rounds, state.progress


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_broker_restart_mid_aggregation_completes(fleet: Fleet, own_broker: RestartableBroker, sig) -> None:
    """SIGTERM makes Mosquitto publish every agent's last will to the still-connected manager; neither that nor
    the lost sessions (no persistence) may fail the project or lose a round."""
    project_id = _training(fleet)
    own_broker.restart(sig, DOWNTIME_S)
    _completed(fleet, project_id)
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def test_broker_restart_while_the_manager_is_paused_and_agents_reconnect_first(
    fleet: Fleet, own_broker: RestartableBroker
) -> None:
    """Agents are back (and report rounds) before the manager has a session again: nothing they publish in
    that window may be lost."""
    project_id = _training(fleet)
    manager = fleet.manager.proc
    assert manager is not None
    os.kill(manager.pid, signal.SIGSTOP)
    try:
        own_broker.restart(signal.SIGKILL, DOWNTIME_S)
        fleet.feed.wait_agents(list(fleet.agents), timeout=60)
        # Training goes on meanwhile: a round is reported while the manager cannot hear it (it has no session).
        with Bus(
            own_broker.address, BusOptions(client_id=new_id("t"), subscriptions=[topics.ALL_AGENT_REPORTS])
        ) as bus:
            deadline = time.monotonic() + PROJECT_TIMEOUT
            while True:
                report = json.loads(bus.inbox.get(timeout=max(0.1, deadline - time.monotonic())).payload)
                if report["project_id"] == project_id and report["kind"] == "round.completed":
                    break
    finally:
        os.kill(manager.pid, signal.SIGCONT)
    _completed(fleet, project_id)


def test_stop_project_sent_while_agents_are_away_is_executed(fleet: Fleet, own_broker: RestartableBroker) -> None:
    """The broker comes back empty; the manager reconnects first and the user cancels: the stop_project
    commands have no subscriber yet. Once the agents are back, they must still run them."""
    project_id = _training(fleet, rounds=60)
    agents = [a.proc for a in fleet.agents.values()]
    for proc in agents:
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        own_broker.restart(signal.SIGKILL, downtime=1.0)
        with Client(own_broker.address) as client:
            deadline = time.monotonic() + 30
            reply = None
            while reply is None:
                try:
                    reply = client.cancel(project_id, "stop across a restart", timeout=5)
                except Exception:
                    # The manager may not have reconnected yet: its paho backoff decides when.
                    if time.monotonic() > deadline:
                        raise
        assert reply.project_id == project_id and not reply.errors, reply
        state = fleet.feed.wait_finished(project_id, 30)
        assert state.outcome is not None and state.outcome.value == "cancelled"
    finally:
        for proc in agents:
            assert proc is not None
            os.kill(proc.pid, signal.SIGCONT)
    # Learners, SuperNodes and the aggregator stop because the agents executed stop_project.
    wait_no_processes(project_id, timeout=CLEANUP_TIMEOUT)


def test_project_states_are_back_after_a_broker_restart(fleet: Fleet, own_broker: RestartableBroker) -> None:
    """Retained states live in the broker's memory; the manager publishes them again from its store."""
    finished, _ = fleet.run(fleet.sla(training_rounds=1))
    running = fleet.feed.submit(fleet.sla(training_rounds=40))
    fleet.feed.wait_stage(running, "aggregation", PROJECT_TIMEOUT)
    own_broker.restart(signal.SIGKILL, downtime=1.0)

    def both_back() -> bool:
        listing = cli(own_broker.address, "project", "list", "--json")
        return listing.returncode == 0 and finished in listing.stdout and running in listing.stdout

    fleet.feed.wait(both_back, 60, "both projects listed again")
    status = cli(own_broker.address, "project", "status", finished)
    assert status.returncode == 0 and "completed" in status.stdout, status.stdout + status.stderr
    with Client(own_broker.address) as client:
        client.cancel(running, "done")
    fleet.feed.wait_finished(running, 30)


def test_after_its_agent_restarts_a_finished_projects_model_url_tells_the_truth(fleet: Fleet) -> None:
    """kill -9 of the serving agent takes the model server along; started again, the agent serves the model
    on the same URL, and the state says so (it never keeps advertising a dead URL)."""
    project_id, state = fleet.run(fleet.sla(training_rounds=1, post_training=True))
    assert state.outcome is not None and state.outcome.value == "completed" and state.model_url
    url = state.model_url
    assert answers_ping(url)
    node0 = fleet.agents["node-0"]
    node0.kill9()
    node0.start()
    fleet.feed.wait_event(project_id, lambda e: "serving again" in e.message, 60, "the model served again")
    with Client(fleet.broker) as client:
        assert client.state(project_id).model_url == url
    assert answers_ping(url)
    fleet.feed.wait_agents(["node-0"])
