"""The manager's agent registry: bounded, evicting the offline agent heard from longest ago first."""

from __future__ import annotations

from pathlib import Path

from flops.agents import AgentRegistry
from flops.messages import AgentStatus
from tests.engine_support import EngineHarness


def _status(agent_id: str, online: bool = True, **fields: object) -> AgentStatus:
    return AgentStatus(agent_id=agent_id, online=online, roles=["learner"], ts=1.0, **fields)  # type: ignore[arg-type]


def test_updates_of_known_agents_return_the_previous_status() -> None:
    registry = AgentRegistry(max_agents=2)
    first = registry.update(_status("a"))
    assert first.accepted and first.previous is None and first.evicted is None
    again = registry.update(_status("a", online=False))
    assert again.accepted and again.previous == _status("a")
    assert registry.get("a") == _status("a", online=False)


def test_a_full_registry_evicts_the_offline_agent_heard_from_longest_ago() -> None:
    registry = AgentRegistry(max_agents=3)
    registry.update(_status("old", online=False))
    registry.update(_status("newer", online=False))
    registry.update(_status("up"))
    # "old" is heard from again (still offline): now "newer" is the one heard from longest ago.
    registry.update(_status("old", online=False, cpus=2))
    joined = registry.update(_status("newcomer"))
    assert joined.accepted and joined.evicted == "newer"
    assert sorted(registry.agents) == ["newcomer", "old", "up"]
    assert registry.update(_status("another")).evicted == "old"
    assert sorted(registry.agents) == ["another", "newcomer", "up"]


def test_an_agent_that_came_back_online_is_not_evicted() -> None:
    registry = AgentRegistry(max_agents=2)
    registry.update(_status("a", online=False))
    registry.update(_status("b", online=False))
    registry.update(_status("a"))
    assert registry.update(_status("c")).evicted == "b"
    assert sorted(registry.agents) == ["a", "c"]


def test_a_newcomer_is_refused_when_every_known_agent_is_online() -> None:
    registry = AgentRegistry(max_agents=2)
    registry.update(_status("a"))
    registry.update(_status("b"))
    refused = registry.update(_status("c"))
    assert not refused.accepted
    assert refused.refused == "agent registry full: 2 agents, all online"
    assert sorted(registry.agents) == ["a", "b"]
    # Known agents still update; once one goes offline the newcomer fits.
    assert registry.update(_status("a", online=False)).accepted
    assert registry.update(_status("c")).evicted == "a"


def test_the_registry_never_exceeds_its_bound() -> None:
    registry = AgentRegistry(max_agents=100)
    for i in range(1_000):
        registry.update(_status(f"a-{i}", online=i % 3 == 0))
    assert len(registry.agents) == 100


def test_the_engine_bounds_its_registry_by_the_setting_and_reports_a_refusal(tmp_path: Path) -> None:
    h = EngineHarness(tmp_path, max_agents=2)
    h.announce("a")
    h.announce("b")
    result = h.announce("c")
    assert result.verdict == "reject" and "agent registry full" in result.reason
    assert h.published[-1].topic == "flops/v1/errors"
    assert h.engine.agents.get("c") is None
    h.offline("a")
    assert h.announce("c").verdict == "accept"
    assert sorted(h.engine.agents.agents) == ["b", "c"]
