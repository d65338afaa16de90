"""The manager's trust rules at engine level (fake clock, no broker): provisioned agents, secrets kept to the
builder, customers bound to their topic. The attacks themselves run against a real deployment in
tests/test_attacks.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flops.errors import ConfigError
from flops.lifecycle_stages import Stage
from flops.messages import AgentStatus, ProjectRequest, Reply
from flops.provisioning import AgentPolicy
from flops.redact import redact
from flops.sla import ProjectSLA
from tests.engine_support import EngineHarness, sla_body

SECRET = "ghp_s3cr3t"


@pytest.fixture
def h(tmp_path: Path) -> EngineHarness:
    return EngineHarness(tmp_path)


def test_provisioned_agents_and_granted_roles(tmp_path: Path) -> None:
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"agents": {"node-1": {"roles": ["learner"]}}}))
    policy = AgentPolicy.load(path)
    assert policy.refusal(AgentStatus(agent_id="node-1", online=True, roles=["learner"])) is None
    assert "not provisioned" in str(policy.refusal(AgentStatus(agent_id="ghost", online=True)))
    greedy = AgentStatus(agent_id="node-1", online=True, roles=["learner", "builder"])
    assert policy.refusal(greedy) == "agent node-1 claims roles it was not granted: builder"
    path.write_text('{"agents": {"node-1": {"roles": ["root"]}}}')
    with pytest.raises(ConfigError, match="agents file"):
        AgentPolicy.load(path)


def test_redact_hides_user_information_only() -> None:
    assert redact(f"fatal: https://bob:{SECRET}@git.example/r.git not found") == (
        "fatal: https://***@git.example/r.git not found"
    )
    assert redact("ssh://git@host/x and http://host/y@z") == "ssh://***@host/x and http://host/y@z"


def test_a_token_in_the_repo_url_reaches_only_the_builders_command(h: EngineHarness) -> None:
    h.fleet(2)
    body = sla_body(learners=2)
    body["ml_repo_url"] = f"https://bob:{SECRET}@git.example/repo.git"
    pid = h.submit(body)
    h.drive(pid, Stage.FINISHED)
    by_kind = {c.kind: c for c in h.commands(pid)}
    assert SECRET in json.dumps(by_kind["build"].spec)
    others = [c for c in h.commands(pid) if c.kind != "build"]
    assert others and not [c for c in others if SECRET in c.model_dump_json()]
    assert not [e for e in h.events(pid) if SECRET in e.model_dump_json()]
    assert SECRET not in h.state(pid).model_dump_json()


def test_the_sla_customer_is_the_topics(h: EngineHarness) -> None:
    unnamed = {k: v for k, v in sla_body().items() if k != "customerID"}
    result = h.engine.request("alice", json.dumps({"request_id": "r-1", "sla": unnamed}).encode(), None)
    record = h.store.get(result.project_id or "")
    assert record is not None and record.sla["customerID"] == "alice"
    assert [i.topic for i in result.outbox if i.retain] == [
        f"flops/v1/customers/alice/projects/{record.project_id}/state"
    ]
    request = ProjectRequest(request_id="r-2", sla=ProjectSLA.model_validate(sla_body()))  # names "tests"
    refused = h.engine.request("alice", request.to_bytes(), None)
    reply = Reply.model_validate_json(refused.outbox[0].payload)
    assert refused.verdict == "reject" and reply.errors and reply.errors[0].field == "sla.customerID"
    assert refused.outbox[0].topic == "flops/v1/customers/alice/requests/r-2/reply"


def test_a_cancel_under_another_customer_knows_no_such_project(h: EngineHarness) -> None:
    h.fleet(1)
    pid = h.submit(sla_body(learners=1))
    cancel = json.dumps({"request_id": "c-1", "reason": "mine"}).encode()
    result = h.engine.cancel("mallory", pid, cancel, None)
    assert result.verdict == "reject" and result.reason == f"unknown project {pid}"
    assert h.stage(pid) is Stage.PREPARATION


def test_a_response_topic_outside_the_requesters_replies_is_ignored(h: EngineHarness) -> None:
    request = ProjectRequest(request_id="r-3", sla=ProjectSLA.model_validate(sla_body()))
    for foreign in ("flops/v1/agents/node-1/commands", "flops/v1/customers/other/requests/r-3/reply", "x/#"):
        result = h.engine.request("tests", request.to_bytes(), foreign)
        assert [i.topic for i in result.outbox if i.key.startswith("reply:")] == [
            "flops/v1/customers/tests/requests/r-3/reply"
        ]
