"""``flops agents``, ``flops data mock`` and ``flops data ls`` against real agent processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flops.client import Client
from flops.data.mock import load_dataset
from tests.support import AgentProc, cli, wait_until


@pytest.fixture
def two_agents(broker, tmp_path: Path):
    agents = [AgentProc(f"data-{i}", tmp_path / f"a{i}", "learner", broker).start() for i in range(2)]
    try:
        for agent in agents:
            agent.wait_online()
        yield [a.agent_id for a in agents]
    finally:
        for agent in agents:
            agent.stop()
        with Client(broker) as client:
            gone = {a.agent_id: a.online for a in client.agents()}
        # A stopped agent says so (retained offline status), it does not vanish.
        assert gone.get("data-0") is False and gone.get("data-1") is False


def test_mock_pushes_one_iid_partition_per_agent_and_ls_shows_them(broker, two_agents) -> None:
    pushed = cli(
        broker, "data", "mock", "--dataset", "digits", "--tag", "digits", "--to", "data-0", "--to", "data-1", "--json"
    )
    assert pushed.returncode == 0, pushed.stderr
    rows = {r["agent_id"]: r["rows"] for r in json.loads(pushed.stdout)}
    assert sum(rows.values()) == load_dataset("digits", split="train").num_rows
    assert abs(rows["data-0"] - rows["data-1"]) <= 1

    listed = cli(broker, "data", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    held = {(r["agent_id"], r["tag"]): r["rows"] for r in json.loads(listed.stdout)}
    assert held == {("data-0", "digits"): rows["data-0"], ("data-1", "digits"): rows["data-1"]}

    # The agents re-announce their data tags when data arrives, so the manager sees them.
    def announced() -> bool:
        out = json.loads(cli(broker, "agents", "--json").stdout)
        return all(a["data_tags"].get("digits") == rows[a["agent_id"]] for a in out if a["agent_id"] in rows)

    wait_until(announced, timeout=20, what="agents announcing their data tags")


def test_mock_refuses_unknown_targets_and_bad_tags(broker, two_agents) -> None:
    missing = cli(broker, "data", "mock", "--to", "nobody")
    assert missing.returncode == 1 and "nobody" in missing.stderr
    bad = cli(broker, "data", "mock", "--tag", "a.b")
    assert bad.returncode == 1 and "a.b" in bad.stderr


def test_mock_accepts_an_original_mock_data_sla(broker, two_agents, tmp_path: Path) -> None:
    sla = tmp_path / "mock.json"
    sla.write_text(
        json.dumps(
            {
                "customerID": "Admin",
                "mock_data_configuration": {
                    "dataset_name": "digits",
                    "number_of_partitions": 2,
                    "data_tag": "sla_digits",
                },
            }
        )
    )
    pushed = cli(broker, "data", "mock", "--sla", str(sla), "--json")
    assert pushed.returncode == 0, pushed.stderr
    assert {r["tag"] for r in json.loads(pushed.stdout)} == {"sla_digits"}
    # The original's bundled mock SLAs name Hugging Face datasets, which are never downloaded here.
    original = Path(__file__).parent / "fixtures" / "original_slas" / "mocks" / "mnist_simple.SLA.json"
    refused = cli(broker, "data", "mock", "--sla", str(original))
    assert refused.returncode != 0 and "mnist" in refused.stderr
