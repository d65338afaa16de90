"""The manager hands the aggregator the public keys of exactly the learners it chose (flops.runtime.flower_tls)."""

from __future__ import annotations

from pathlib import Path

import pytest

from flops.lifecycle_stages import Stage
from tests.engine_support import EngineHarness, sla_body


@pytest.fixture
def h(tmp_path: Path) -> EngineHarness:
    return EngineHarness(tmp_path)


def test_run_aggregator_carries_the_chosen_learners_keys(h: EngineHarness) -> None:
    h.fleet(2)
    h.announce("extra", ("learner",), {"digits": 1})
    pid = h.submit(sla_body(learners=2))
    h.drive(pid, Stage.LEARNERS)
    cmds = h.commands(pid, "run_learner")
    # A key from an agent the manager did not pick is ignored with its report.
    assert h.report(cmds[0], "learner.ready", agent_id="extra", public_key="ecdsa-sha2-nistp384 INTRUDER").verdict == (
        "ignore"
    )
    for cmd in cmds:
        h.report(cmd, "learner.ready", agent_id=cmd.agent_id, public_key=f"ecdsa-sha2-nistp384 KEY-{cmd.agent_id}")
    assert h.stage(pid) is Stage.AGGREGATION
    spec = h.command(pid, "run_aggregator").spec
    assert spec["supernode_keys"] == [f"ecdsa-sha2-nistp384 KEY-{agent}" for agent in sorted(c.agent_id for c in cmds)]


def test_run_aggregator_has_no_keys_when_learners_dial_in_plaintext(h: EngineHarness) -> None:
    h.fleet(2)
    pid = h.submit(sla_body(learners=2))
    h.drive(pid, Stage.LEARNERS)
    for cmd in h.commands(pid, "run_learner"):
        h.report(cmd, "learner.ready", agent_id=cmd.agent_id)
    assert h.command(pid, "run_aggregator").spec["supernode_keys"] == []


def test_agent_passes_only_the_configured_tls_files(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from flops.agent import Agent, AgentConfig

    def args(config: AgentConfig) -> list[str]:
        agent = SimpleNamespace(config=config)
        return Agent._tls_args(agent, "--tls-ca-file", "--tls-cert-file", "--tls-key-file")  # type: ignore[arg-type]

    assert args(AgentConfig("a", tmp_path)) == []
    files = {"tls_ca_file": tmp_path / "ca", "tls_cert_file": tmp_path / "crt", "tls_key_file": tmp_path / "key"}
    assert args(AgentConfig("a", tmp_path, **files)) == [
        "--tls-ca-file", str(tmp_path / "ca"), "--tls-cert-file", str(tmp_path / "crt"),
        "--tls-key-file", str(tmp_path / "key"),
    ]  # fmt: skip
