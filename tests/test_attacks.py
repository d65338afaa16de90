"""Attacks on a production deployment, each as a real client with real credentials: the broker, its ACL and
certificates written by ``flops setup production``, the manager and two agents as real processes configured
from nothing but their env files. Two customers (alice, bob), two agents (node-1 builds and learns; node-2,
granted only ``learner``, plays the compromised agent) and an operator (ops, the observer).

Each attack is refused (by the broker: the publish's PUBACK carries an error; or by the manager: a message on
``flops/v1/errors``), and the victim's project is left as it was. node-1's builds sit in a ``uv`` that sleeps
(a fake first on its PATH), so victims' projects stay in the builder stage, with a command to forge a report for.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flops import topics
from flops.broker import free_port
from flops.bus import Bus
from flops.client import Client
from flops.errors import NotFound, PublishFailed
from flops.messages import AgentStatus, ProjectRequest, Reply, new_id
from flops.settings import Settings
from flops.sla import ProjectSLA
from tests.base_support import ProjectFeed
from tests.prod_support import bus, env_of, mosquitto, setup_production
from tests.support import AgentProc, ManagerProcess, make_git_repo

SECRET = "s3cr3t-token"


def settings_of(directory: Path, name: str) -> Settings:
    return Settings(**{k.removeprefix("FLOPS_").lower(): v for k, v in env_of(directory, name).items()})


@dataclass
class Prod:
    directory: Path
    feed: ProjectFeed  # ops: reads everything
    errors: Bus  # ops, subscribed to flops/v1/errors
    manager: ManagerProcess
    agents: dict[str, AgentProc]
    repo_url: str

    def client(self, name: str) -> Client:
        s = settings_of(self.directory, name)
        return Client(s.broker(), **s.broker_tls_files())

    def sla(self, **extra: Any) -> dict[str, Any]:
        """A request without data tags (any learner counts) whose build hangs on node-1."""
        return {
            "ml_repo_url": self.repo_url,
            "ml_model_flavor": "sklearn",
            "training_configuration": {"training_rounds": 1, "min_available_clients": 2},
            "post_training_steps": [],
            **extra,
        }

    def submit(self, customer: str, **extra: Any) -> str:
        with self.client(customer) as client:
            reply = client.submit(ProjectSLA.model_validate(self.sla(**extra)))
        assert reply.project_id and not reply.errors, reply
        return reply.project_id

    def in_builder(self, project_id: str) -> str:
        """Wait until the project waits for node-1's build; returns the build command's id."""
        self.feed.wait_stage(project_id, "builder", 60)
        (build,) = self.feed.wait(lambda: self.feed.commands(project_id, "build"), 30, "the build command")
        assert build.agent_id == "node-1"
        return build.command_id

    def expect_error(self, text: str, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                error = json.loads(self.errors.inbox.get(timeout=left).payload)
            except queue.Empty:
                break
            if text in error["reason"]:
                return error
            seen.append(error["reason"])
        raise AssertionError(f"no error containing {text!r} on flops/v1/errors; saw {seen}")

    def unchanged(self, project_id: str, stage: str) -> None:
        """Still in ``stage``, and nothing on its stream but what the manager said on its own."""
        state = self.feed.state(project_id)
        assert state is not None and state.stage.value == stage and state.outcome is None, state
        assert not [e for e in self.feed.events(project_id) if e.kind == "rejected" or "succeeded" in e.message]


@pytest.fixture(scope="module")
def prod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prod]:
    tmp = tmp_path_factory.mktemp("attacks")
    directory = tmp / "flops"
    setup_production(
        directory,
        *("--agents", "node-1,node-2", "--customers", "alice,bob", "--operators", "ops"),
        *("--port", str(free_port()), "--agent-roles", "node-2=learner"),
    )
    slow = tmp / "slow-uv-bin"
    slow.mkdir()
    (slow / "uv").write_text(f"#!{sys.executable}\nimport time\ntime.sleep(600)\n")
    (slow / "uv").chmod(0o755)
    with mosquitto(directory):
        ops = settings_of(directory, "ops")
        feed = ProjectFeed(ops.broker(), **ops.broker_tls_files())
        errors = bus(directory, "ops", [topics.errors()])
        manager = ManagerProcess(
            ops.broker(),
            tmp / "manager",
            {**env_of(directory, "manager"), "FLOPS_DATA_DIR": str(tmp / "manager")},
            watcher=lambda: bus(directory, "ops", [topics.manager_status()]),
        )
        agents = {
            "node-1": AgentProc(
                "node-1",
                tmp / "node-1",
                "learner,builder,aggregator,serve",
                ops.broker(),
                env={**env_of(directory, "node-1"), "PATH": f"{slow}{os.pathsep}{os.environ['PATH']}"},
            ),
            "node-2": AgentProc("node-2", tmp / "node-2", "learner", ops.broker(), env=env_of(directory, "node-2")),
        }
        prod = Prod(directory, feed, errors, manager, agents, make_git_repo(tmp / "repo"))
        try:
            manager.start()
            for agent in agents.values():
                agent.start()
            feed.wait_agents(list(agents), timeout=60)
            yield prod
        finally:
            for agent in agents.values():
                agent.stop()
            manager.stop()
            errors.close()
            feed.close()


def _refused(publish: Callable[[], None]) -> None:
    with pytest.raises(PublishFailed, match="refused"):
        publish()


# --- agents: identity comes from the credential -----------------------------------------------------------


def test_a_customer_cannot_pose_as_an_agent_and_be_picked(prod: Prod) -> None:
    """Before: alice announced an agent 'alice' with every role and was sent bob's build command."""
    alice = bus(prod.directory, "alice", [topics.agent_commands("alice")])
    try:
        fake = AgentStatus(agent_id="alice", online=True, roles=["learner", "builder", "aggregator", "serve"])
        _refused(lambda: alice.publish_wait(topics.agent_status("alice"), fake.to_bytes(), retain=True))
        victim = prod.submit("bob")
        prod.in_builder(victim)
        assert {c.agent_id for c in prod.feed.commands(victim)} == {"node-1"}
        assert alice.inbox.empty()
    finally:
        alice.close()


def test_reports_are_accepted_only_from_the_agent_the_command_went_to(prod: Prod) -> None:
    """node-2 (compromised) forges the success of bob's build, which went to node-1; alice tries too."""
    victim = prod.submit("bob")
    command_id = prod.in_builder(victim)
    forged = {
        "event_id": new_id("e"),
        "project_id": victim,
        "source": "agent/node-1",
        "command_id": command_id,
        "kind": "build.succeeded",
        "artifact": {"ref": "env://evil", "details": {"python": "/bin/sh", "repo_dir": "/"}},
    }
    node2 = bus(prod.directory, "node-2")
    alice = bus(prod.directory, "alice")
    try:
        # On its own topic: the manager refuses it (no command of the project went to node-2).
        node2.publish_wait(topics.agent_reports("node-2"), json.dumps(forged).encode())
        prod.expect_error(f"for project {victim} from agent node-2, which was sent no such command")
        # On node-1's topic, or as a customer: the broker refuses.
        _refused(lambda: node2.publish_wait(topics.agent_reports("node-1"), json.dumps(forged).encode()))
        _refused(lambda: alice.publish_wait(topics.agent_reports("node-1"), json.dumps(forged).encode()))
        # A replay of node-1's own build.started by node-2 fares no better.
        replay = forged | {"event_id": new_id("e"), "kind": "build.started"}
        replay.pop("artifact")
        node2.publish_wait(topics.agent_reports("node-2"), json.dumps(replay).encode())
        prod.expect_error(f"for project {victim} from agent node-2")
    finally:
        node2.close()
        alice.close()
    prod.unchanged(victim, "builder")


def test_a_status_naming_another_agent_or_roles_not_granted_is_refused(prod: Prod) -> None:
    node2 = bus(prod.directory, "node-2")
    try:
        spoof = AgentStatus(agent_id="node-1", online=False, roles=["learner"])
        node2.publish_wait(topics.agent_status("node-2"), spoof.to_bytes(), retain=True)
        prod.expect_error("status names agent node-1 on agent node-2's topic")
        greedy = AgentStatus(agent_id="node-2", online=True, roles=["learner", "builder", "aggregator", "serve"])
        node2.publish_wait(topics.agent_status("node-2"), greedy.to_bytes(), retain=True)
        prod.expect_error("agent node-2 claims roles it was not granted: aggregator, builder, serve")
    finally:
        node2.close()
        prod.agents["node-2"].stop()
        prod.agents["node-2"].start()
        prod.feed.wait_agents(["node-2"], timeout=60)
    # node-1 still counts as online: a new project is built there.
    prod.in_builder(prod.submit("alice"))


def test_an_agent_cannot_submit_or_cancel(prod: Prod) -> None:
    node1 = bus(prod.directory, "node-1")
    try:
        request = ProjectRequest(request_id=new_id("r"), sla=ProjectSLA.model_validate(prod.sla()))
        _refused(lambda: node1.publish_wait(topics.requests("node-1"), request.to_bytes()))
        _refused(lambda: node1.publish_wait(topics.requests("alice"), request.to_bytes()))
        _refused(lambda: node1.publish_wait(topics.project_cancel("alice", "p-x"), b"{}"))
    finally:
        node1.close()


# --- customers are isolated ----------------------------------------------------------------------------------


def test_a_customer_cannot_cancel_or_read_anothers_project(prod: Prod) -> None:
    """Before: bob cancelled alice's project and read every state and event."""
    greedy = bus(prod.directory, "bob", ["#"])
    try:
        victim = prod.submit("alice")
        prod.in_builder(victim)
        bob = bus(prod.directory, "bob", [f"{topics.PREFIX}/customers/bob/requests/+/reply"])
        try:
            cancel = json.dumps({"request_id": new_id("c"), "reason": "mine now"}).encode()
            _refused(lambda: bob.publish_wait(topics.project_cancel("alice", victim), cancel))
            # Under his own name: the manager knows no such project of his.
            bob.publish_wait(topics.project_cancel("bob", victim), cancel)
            reply = Reply.model_validate_json(bob.inbox.get(timeout=15).payload)
            assert reply.errors and f"unknown project {victim}" in reply.errors[0].message
        finally:
            bob.close()
        with prod.client("bob") as client, pytest.raises(NotFound):
            client.cancel(victim, "through the CLI")
        prod.unchanged(victim, "builder")
        leaked = []
        while not greedy.inbox.empty():
            leaked.append(greedy.inbox.get().topic)
        # Bob's own cancel under his name comes back to him; nothing of alice's does.
        assert not [t for t in leaked if "/alice/" in t or t.endswith((f"{victim}/state", f"{victim}/events"))]
    finally:
        greedy.close()


def test_request_ids_are_per_customer(prod: Prod) -> None:
    """Before: bob reusing alice's request id got alice's project id back."""
    shared = new_id("r")
    with prod.client("alice") as alice, prod.client("bob") as bob:
        mine = alice.submit(ProjectSLA.model_validate(prod.sla()), request_id=shared)
        theirs = bob.submit(ProjectSLA.model_validate(prod.sla()), request_id=shared)
    assert mine.project_id and theirs.project_id and theirs.project_id != mine.project_id
    assert not theirs.duplicate


def test_an_sla_naming_another_customer_is_refused(prod: Prod) -> None:
    with prod.client("alice") as alice:
        reply = alice.submit(ProjectSLA.model_validate(prod.sla(customerID="bob")))
    assert reply.errors and reply.errors[0].field == "sla.customerID"


@pytest.mark.parametrize("target", ["commands", "state"])
def test_the_response_topic_is_honoured_only_in_the_requesters_own_replies(prod: Prod, target: str) -> None:
    """Before: a requester made the manager publish onto an agent's commands and another project's state."""
    victim_topic = topics.agent_commands("node-1") if target == "commands" else topics.project_state("bob", "p-x")
    watcher = bus(prod.directory, "ops", [victim_topic])
    request_id = new_id("r")
    own = topics.request_reply("alice", request_id)
    alice = bus(prod.directory, "alice", [own])
    try:
        request = json.dumps({"request_id": request_id, "sla": prod.sla()}).encode()
        alice.publish(topics.requests("alice"), request, response_topic=victim_topic)
        reply = Reply.model_validate_json(alice.inbox.get(timeout=15).payload)
        assert reply.project_id
        prod.in_builder(reply.project_id)  # commands went out meanwhile
        stray = []
        while not watcher.inbox.empty():
            stray.append(watcher.inbox.get().payload)
        assert not [p for p in stray if b"request_id" in p], stray
    finally:
        alice.close()
        watcher.close()


# --- secrets -------------------------------------------------------------------------------------------------


def test_credentials_in_the_repo_url_reach_nobody_but_the_builder(prod: Prod) -> None:
    url = f"https://bob:{SECRET}@127.0.0.1:{free_port()}/repo.git"  # nothing listens: preparation fails
    victim = prod.submit("bob", ml_repo_url=url)
    state = prod.feed.wait_finished(victim, 60)
    assert state.reason and "***@127.0.0.1" in state.reason and SECRET not in state.reason
    assert not [e for e in prod.feed.events(victim) if SECRET in e.model_dump_json()]
    assert SECRET not in prod.manager.log_tail(10_000_000)


# --- the data plane ------------------------------------------------------------------------------------------


def test_a_nodes_data_server_refuses_whoever_has_no_token(prod: Prod) -> None:
    """Before: anyone reaching a data server could list, read, poison and drop any node's data, in plaintext."""
    import pyarrow as pa

    from flops.data.client import DataAccessDenied, DataClient, DataError

    location = prod.feed.agents["node-1"].data_server
    assert location and location.startswith("grpc+tls://127.0.0.1:"), location
    ca = settings_of(prod.directory, "ops").tls_ca_file
    table = pa.table({"x": [1, 2, 3]})
    for token in (None, "guessed", "Bearer"):
        client = DataClient(location, token=token, ca_file=ca)
        with pytest.raises(DataAccessDenied):
            client.list()
        with pytest.raises(DataAccessDenied):
            client.put("poison", table)
        with pytest.raises(DataAccessDenied):
            client.drop(["digits"])
    # Without the fleet's CA the connection itself fails (and nothing travels in plaintext).
    with pytest.raises(DataError):
        DataClient(location.replace("grpc+tls://", "grpc://"), token="guessed").list()
