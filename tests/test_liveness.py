"""A last will is a hint: the engine treats an agent as gone only when it stays gone past the grace period,
and after a fresh broker session every agent must announce itself again (engine level, fake clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flops.lifecycle_stages import Outcome, Stage
from flops.messages import AgentStatus
from tests.engine_support import EngineHarness, sla_body


@pytest.fixture
def h(tmp_path: Path) -> EngineHarness:
    return EngineHarness(tmp_path, agent_grace_s=30.0)


def _training(h: EngineHarness) -> str:
    h.fleet(2)
    pid = h.submit(sla_body(learners=2))
    h.drive(pid, Stage.AGGREGATION)
    return pid


def test_a_will_followed_by_a_birth_within_the_grace_changes_nothing(h: EngineHarness) -> None:
    """What a broker's graceful stop looks like: every will at once, every agent back seconds later."""
    pid = _training(h)
    for agent_id in ("agg-1", "learner-0", "learner-1"):
        h.will(agent_id)
    h.clock.advance(10)
    for agent_id in ("agg-1", "learner-0", "learner-1"):
        h.announce(agent_id, ("aggregator", "serve") if agent_id == "agg-1" else ("learner",))
    h.clock.advance(60)
    h.published.extend(h.engine.check_suspects())
    assert h.stage(pid) is Stage.AGGREGATION
    h.drive(pid, Stage.FINISHED)
    record = h.store.get(pid)
    assert record is not None and record.outcome is Outcome.COMPLETED


def test_an_agent_that_stays_gone_fails_its_project_after_the_grace(h: EngineHarness) -> None:
    pid = _training(h)
    h.will("agg-1")
    h.clock.advance(29)
    h.published.extend(h.engine.check_suspects())
    assert h.stage(pid) is Stage.AGGREGATION
    h.clock.advance(1)
    h.published.extend(h.engine.check_suspects())
    record = h.store.get(pid)
    assert record is not None and record.outcome is Outcome.FAILED
    assert "agg-1 went offline" in (record.reason or "")


def test_after_a_fresh_session_an_agent_that_never_announces_itself_is_gone(h: EngineHarness) -> None:
    """An agent that died while the broker was away left no will anywhere: silence after the new session
    is the only sign."""
    pid = _training(h)
    h.engine.fresh_session()
    for agent_id in ("learner-0", "learner-1"):
        h.announce(agent_id, ("learner",))
    h.clock.advance(30)
    h.published.extend(h.engine.check_suspects())
    record = h.store.get(pid)
    assert record is not None and record.outcome is Outcome.FAILED and "agg-1" in (record.reason or "")
    gone = h.engine.agents.get("agg-1")
    assert gone is not None and not gone.online


def test_a_status_naming_another_agent_is_refused(h: EngineHarness) -> None:
    h.fleet(1)
    spoof = AgentStatus(agent_id="learner-0", online=False, roles=["learner"])
    result = h.engine.agent_status("attacker", spoof.to_bytes())
    assert result.verdict == "reject" and "names agent learner-0" in result.reason
    status = h.engine.agents.get("learner-0")
    assert status is not None and status.online


def test_offline_statuses_of_unknown_agents_do_not_grow_the_registry(h: EngineHarness) -> None:
    for i in range(1000):
        status = AgentStatus(agent_id=f"ghost-{i}", online=False)
        assert h.engine.agent_status(f"ghost-{i}", status.to_bytes()).verdict == "ignore"
    assert h.engine.agents.agents == {}


def test_a_finished_projects_model_server_can_come_back_or_be_gone(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    h.drive(pid, Stage.FINISHED)
    assert h.state(pid).model_url == "http://127.0.0.1:9/"
    serve = h.command(pid, "serve_model")
    assert h.report(serve, "model.served", url="http://127.0.0.1:10/").verdict == "accept"
    assert h.state(pid).model_url == "http://127.0.0.1:10/"
    assert h.report(serve, "model.failed", reason="port taken").verdict == "accept"
    assert h.state(pid).model_url is None
    assert "port taken" in h.events(pid)[-1].message
