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


def test_mock_pushes_one_iid_partition_per_agent_and_ls_shows_them(broker, two_agents, tmp_path: Path) -> None:
    dirs = ["--agent-dir", str(tmp_path / "a0"), "--agent-dir", str(tmp_path / "a1")]
    pushed = cli(
        broker,
        "data",
        "mock",
        "--dataset",
        "digits",
        "--tag",
        "digits",
        "--to",
        "data-0",
        "--to",
        "data-1",
        *dirs,
        "--json",
    )
    assert pushed.returncode == 0, pushed.stderr
    rows = {r["agent_id"]: r["rows"] for r in json.loads(pushed.stdout)}
    assert sum(rows.values()) == load_dataset("digits", split="train").num_rows
    assert abs(rows["data-0"] - rows["data-1"]) <= 1

    # By default the tokens are read from the agents' directories under FLOPS_DATA_DIR.
    listed = cli(broker, "data", "ls", "--json", data_dir=tmp_path)
    assert listed.returncode == 0, listed.stderr
    held = {(r["agent_id"], r["tag"]): r["rows"] for r in json.loads(listed.stdout)}
    assert held == {("data-0", "digits"): rows["data-0"], ("data-1", "digits"): rows["data-1"]}

    # The agents re-announce their data tags when data arrives, so the manager sees them.
    def announced() -> bool:
        out = json.loads(cli(broker, "agents", "--json").stdout)
        return all(a["data_tags"].get("digits") == rows[a["agent_id"]] for a in out if a["agent_id"] in rows)

    wait_until(announced, timeout=20, what="agents announcing their data tags")


def test_mock_refuses_unknown_targets_and_bad_tags(broker, two_agents, tmp_path: Path) -> None:
    missing = cli(broker, "data", "mock", "--to", "nobody")
    assert missing.returncode == 1 and "nobody" in missing.stderr
    bad = cli(broker, "data", "mock", "--tag", "a.b", data_dir=tmp_path)
    assert bad.returncode == 1 and "a.b" in bad.stderr


def test_data_commands_need_the_nodes_admin_token(broker, two_agents, tmp_path: Path) -> None:
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    pushed = cli(broker, "data", "mock", "--to", "data-0", data_dir=empty)
    assert pushed.returncode == 1 and "no data admin token for data-0" in pushed.stderr
    wrong = cli(broker, "data", "mock", "--to", "data-0", "--token", "x" * 24)
    assert wrong.returncode == 1 and "data token is required" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    listed = cli(broker, "data", "ls", "--json", data_dir=empty)
    assert listed.returncode == 0, listed.stderr
    assert all("no data token" in row["error"] for row in json.loads(listed.stdout))
    token = (tmp_path / "a0" / "state" / "data-admin.token").read_text().strip()
    pushed = cli(broker, "data", "mock", "--to", "data-0", "--token", token, "--json")
    assert pushed.returncode == 0, pushed.stderr


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
    pushed = cli(broker, "data", "mock", "--sla", str(sla), "--json", data_dir=tmp_path)
    assert pushed.returncode == 0, pushed.stderr
    assert {r["tag"] for r in json.loads(pushed.stdout)} == {"sla_digits"}
    # The original's bundled mock SLAs name Hugging Face datasets, which are never downloaded here.
    original = Path(__file__).parent / "fixtures" / "original_slas" / "mocks" / "mnist_simple.SLA.json"
    refused = cli(broker, "data", "mock", "--sla", str(original), data_dir=tmp_path)
    assert refused.returncode != 0 and "mnist" in refused.stderr
