"""Tests for the CLI's data operations: mock pushes to real data servers, inventory lists what they hold."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flops.data.mock import load_dataset
from flops.data.ops import inventory, mock
from flops.data.server import DataServer


def _tokens(servers: dict[str, DataServer]) -> list[str]:
    return [s.admin_token for s in servers.values()]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[dict[str, DataServer]]:
    started = {f"agent-{i}": DataServer(tmp_path / f"node{i}", port=0) for i in range(3)}
    for data_server in started.values():
        data_server.start()
    yield started
    for data_server in started.values():
        data_server.stop()


def test_mock_pushes_one_partition_per_server_covering_the_train_split(servers: dict[str, DataServer]) -> None:
    locations = [s.location for s in servers.values()]

    pushed = mock("digits", 3, "digits", locations, seed=7, tokens=_tokens(servers))

    train_rows = load_dataset("digits", split="train").num_rows
    assert [r["location"] for r in pushed] == locations
    assert sum(r["rows"] for r in pushed) == train_rows
    assert max(r["rows"] for r in pushed) - min(r["rows"] for r in pushed) <= 1
    for row, data_server in zip(pushed, servers.values(), strict=True):
        assert row["tag"] == "digits"
        assert (data_server.data_dir / row["file"]).is_file()
        assert data_server.inventory() == {"digits": row["rows"]}


def test_inventory_lists_rows_and_files_per_agent_and_tag(servers: dict[str, DataServer]) -> None:
    pushed = mock("digits", 3, "digits", [s.location for s in servers.values()], tokens=_tokens(servers))
    tokens = {agent_id: s.admin_token for agent_id, s in servers.items()}

    listed = inventory({agent_id: s.location for agent_id, s in servers.items()}, tokens=tokens)

    assert [(r["agent_id"], r["tag"], r["files"], r["error"]) for r in listed] == [
        (agent_id, "digits", 1, None) for agent_id in sorted(servers)
    ]
    assert [r["rows"] for r in listed] == [r["rows"] for r in pushed]
    assert sum(r["rows"] for r in listed) == load_dataset("digits", split="train").num_rows


def test_repeated_mock_stores_nothing_new(servers: dict[str, DataServer]) -> None:
    locations = [s.location for s in servers.values()]

    first = mock("digits", 3, "digits", locations, tokens=_tokens(servers))
    again = mock("digits", 3, "digits", locations, tokens=_tokens(servers))

    assert again == first
    tokens = {a: s.admin_token for a, s in servers.items()}
    assert all(r["files"] == 1 for r in inventory({a: s.location for a, s in servers.items()}, tokens=tokens))


def test_inventory_reports_empty_and_unreachable_agents_without_failing(servers: dict[str, DataServer]) -> None:
    empty = servers["agent-0"]

    locations = {"agent-0": empty.location, "gone": "grpc+tcp://127.0.0.1:1", "agent-1": servers["agent-1"].location}
    tokens = {"agent-0": empty.admin_token, "gone": "x" * 20}

    listed = inventory(locations, tokens=tokens, timeout=5)

    assert listed[0] == {"agent_id": "agent-0", "tag": None, "rows": 0, "files": 0, "error": None}
    assert listed[1]["agent_id"] == "agent-1" and "no data token" in listed[1]["error"]
    assert listed[2]["agent_id"] == "gone"
    assert "unavailable" in listed[2]["error"]


def test_a_wrong_token_is_an_error_row(servers: dict[str, DataServer]) -> None:
    listed = inventory({"agent-0": servers["agent-0"].location}, tokens={"agent-0": "y" * 20}, timeout=5)

    assert "data token is required" in listed[0]["error"]


def test_mock_refuses_mismatched_partitions_and_bad_tags(servers: dict[str, DataServer]) -> None:
    locations = [s.location for s in servers.values()]

    with pytest.raises(ValueError, match="3 data servers"):
        mock("digits", 3, "digits", locations[:2], tokens=_tokens(servers)[:2])
    with pytest.raises(ValueError, match="invalid data tag"):
        mock("digits", 3, "bad.tag", locations, tokens=_tokens(servers))
    assert all(s.inventory() == {} for s in servers.values())
