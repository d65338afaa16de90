"""The data token flow through a real ``flops agent``: the manager's token in a run_learner command lets that
learner read its project's tags on the node's data server, nothing else, until stop_project revokes it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flops.client import Client
from flops.data.client import DataAccessDenied, DataClient
from flops.data.mock import load_dataset, push_partitions, split_iid
from flops.demo import EXAMPLE_REPO
from flops.messages import new_id
from flops.ports import free_port
from flops.settings import BrokerAddress
from tests.support import AgentProc, wait_until
from tests.test_agent_hygiene import listener, send, wait_report

__all__ = ["listener"]  # the fixture, used by the test below


def _refused(location: str, token: str) -> bool:
    try:
        with DataClient(location, token=token, timeout=5) as client:
            client.list(["tok"])
    except DataAccessDenied:
        return True
    return False


def test_a_learner_reads_with_its_projects_token_until_the_project_stops(
    broker: BrokerAddress, listener, tmp_path: Path
) -> None:
    agent = AgentProc("tok-node", tmp_path / "tok-node", "learner", broker).start()
    try:
        agent.wait_online()
        with Client(broker) as client:
            (status,) = [a for a in client.agents() if a.agent_id == agent.agent_id]
        location = status.data_server
        assert location is not None and location.startswith("grpc+tcp://127.0.0.1:")  # loopback by default
        admin = agent.data_token()
        assert (agent.home / "state" / "data-admin.token").stat().st_mode & 0o777 == 0o600
        part = split_iid(load_dataset("digits", split="train"), 4, seed=2)[0]
        push_partitions([part, part.slice(0, 10)], [location, location], "tok", tokens=[admin, admin])
        push_partitions([part.slice(0, 5)], [location], "other", tokens=[admin])

        token = f"manager-issued-{new_id('t')}"
        assert _refused(location, token)
        project_id = f"p-tok-{new_id('x')[2:10]}"
        artifact = {"details": {"python": sys.executable, "repo_dir": str(EXAMPLE_REPO)}}
        cmd = send(
            listener,
            agent,
            project_id,
            "run_learner",
            {
                "aggregator_address": f"127.0.0.1:{free_port()}",  # nobody there: the learner waits
                "data_tags": ["tok"],
                "artifact": artifact,
                "data_token": token,
            },
        )
        # Ready means the learner loaded its data through load_dataset() with the token from its command.
        ready = wait_report(listener, lambda r: r["command_id"] == cmd.command_id, 120, "the learner's first report")
        assert ready["kind"] == "learner.ready", ready
        assert ready["examples"] == part.num_rows + 10

        with DataClient(location, token=token, timeout=10) as learner:
            assert learner.fetch(["tok"]).num_rows == part.num_rows + 10
            with pytest.raises(DataAccessDenied):
                learner.list(["other"])
            with pytest.raises(DataAccessDenied):
                learner.put("tok", part.slice(0, 1))
            with pytest.raises(DataAccessDenied):
                learner.drop(["tok"])

        send(listener, agent, project_id, "stop_project", {})
        wait_until(lambda: _refused(location, token), 30, "the project's data token revoked")
        with DataClient(location, token=admin, timeout=10) as node:
            assert {i.tag for i in node.list()} == {"tok", "other"}
    finally:
        agent.stop()
