"""`flops setup production` writes a broker that really runs: TLS only, anonymous refused, the ACL of issue 7
(customers isolated from each other, agents from each other, the manager allowed what it must), no pattern
warnings; every identity's env file alone is enough for the real CLI and agent; `--add-customer` keeps the
CA and existing passwords; bad names are refused with nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flops import setup
from flops.broker import free_port
from flops.bus import Bus, BusOptions
from flops.cli import app
from flops.errors import BrokerUnavailable, PublishFailed
from flops.messages import AgentStatus, new_id
from flops.settings import Settings
from tests.prod_support import A, C, bus, deliveries, env_of, mosquitto, setup_production
from tests.support import REPO_ROOT, wait_until


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("prod") / "flops"
    port = free_port()
    setup_production(
        directory,
        *("--agents", "node-1,node-2", "--customers", "alice,bob", "--operators", "ops"),
        *("--port", str(port), "--agent-roles", "node-2=learner"),
    )
    with mosquitto(directory):
        yield directory, directory / "mosquitto.log"


def test_files_modes_and_acl_blocks(deployment: tuple[Path, Path]) -> None:
    directory, log = deployment
    for secret in ["ca.key", "broker.key", "passwd", "env/alice.env", "certs/node-1.key", "certs/node-1-node.key"]:
        assert (directory / secret).stat().st_mode & 0o777 == 0o600, secret
    assert json.loads((directory / "agents.json").read_text()) == {
        "agents": {"node-1": {"roles": ["learner", "builder", "aggregator", "serve"]}, "node-2": {"roles": ["learner"]}}
    }
    acl = (directory / "acl").read_text()
    assert "pattern" not in acl
    assert "user alice\ntopic write flops/v1/customers/alice/requests\n" in acl
    manager = env_of(directory, "manager")
    assert manager["FLOPS_AGENTS_FILE"] == str((directory / "agents.json").resolve())
    node = env_of(directory, "node-1")
    assert {"FLOPS_TLS_CA_FILE", "FLOPS_TLS_CERT_FILE", "FLOPS_TLS_KEY_FILE"} <= set(node)
    assert "FLOPS_TLS_CERT_FILE" not in env_of(directory, "alice")
    # Mosquitto read everything and has nothing to warn about (the shipped ACL's patterns made it warn); the
    # warning about running as root comes from this test's `user root`.
    lines = [line for line in log.read_text().lower().splitlines() if "should not be run as root" not in line]
    # (The fixture's port probe connects without TLS, which Mosquitto logs as a failed connection.)
    lines = [line for line in lines if "client connection from" not in line]
    assert not [line for line in lines if any(w in line for w in ("pattern", "warning", "error", "note"))], lines


def test_anonymous_and_wrong_password_are_refused(deployment: tuple[Path, Path]) -> None:
    directory, _ = deployment
    settings = Settings(**{k.removeprefix("FLOPS_").lower(): v for k, v in env_of(directory, "alice").items()})
    address = settings.broker()
    for user, password in [(None, None), ("alice", "guess"), ("mallory", "x")]:
        forged = address.model_copy(update={"username": user, "password": password})
        with pytest.raises(BrokerUnavailable):
            Bus(forged, BusOptions(client_id=new_id("x"), ca_file=str(settings.broker_ca_file))).connect(timeout=5)


def test_customers_are_isolated(deployment: tuple[Path, Path]) -> None:
    directory, _ = deployment
    manager = bus(directory, "manager", [f"{C}/+/requests", f"{C}/+/projects/+/cancel", "flops/v1/clients/manager/#"])
    alice_reads = [f"{C}/alice/requests/+/reply", f"{C}/alice/projects/+/state", f"{C}/alice/projects/+/events"]
    alice = bus(directory, "alice", alice_reads)
    greedy = bus(directory, "alice", ["#", f"{C}/bob/projects/#", f"{C}/+/projects/+/state"])
    try:
        # Alice writes her requests and cancels; the manager reads them.
        alice.publish_wait(f"{C}/alice/requests", b"{}")
        alice.publish_wait(f"{C}/alice/projects/p-a/cancel", b"{}")
        assert deliveries(manager, f"{C}/alice/projects/p-a/cancel") == [
            f"{C}/alice/requests",
            f"{C}/alice/projects/p-a/cancel",
        ]
        alice.publish_wait("flops/v1/clients/alice/marker/m", b"end")
        # Alice may not write as bob, as an agent, as the manager.
        for forged in [
            f"{C}/bob/requests",
            f"{C}/bob/projects/p-b/cancel",
            f"{C}/alice/projects/p-a/state",
            f"{C}/alice/requests/r-1/reply",
            f"{A}/node-1/status",
            f"{A}/node-1/reports",
            f"{A}/node-1/commands",
            "flops/v1/manager/status",
            "flops/v1/errors",
            "flops/v1/clients/bob/marker/m",
        ]:
            with pytest.raises(PublishFailed, match="refused"):
                alice.publish_wait(forged, b"{}")
        # The manager writes bob's state (retained) and events, then alice's reply, state and events: alice
        # reads only her own, even subscribed to `#`.
        manager.publish_wait(f"{C}/bob/projects/p-b/state", b"bob", retain=True)
        manager.publish_wait(f"{C}/bob/projects/p-b/events", b"bob")
        manager.publish_wait(f"{C}/bob/requests/r-b/reply", b"bob")
        manager.publish_wait(f"{C}/alice/requests/r-a/reply", b"alice")
        manager.publish_wait(f"{C}/alice/projects/p-a/events", b"alice")
        manager.publish_wait(f"{C}/alice/projects/p-a/state", b"alice", retain=True)
        mine = [f"{C}/alice/requests/r-a/reply", f"{C}/alice/projects/p-a/events", f"{C}/alice/projects/p-a/state"]
        assert deliveries(alice, mine[-1]) == mine
        assert not [t for t in deliveries(greedy, mine[-1]) if "/bob/" in t]
        # Nor from the retained store when subscribing later.
        late = bus(directory, "alice", [f"{C}/+/projects/+/state"])
        try:
            assert deliveries(late, mine[-1]) == [mine[-1]]
        finally:
            late.close()
        # An operator reads everyone's and may cancel anyone's project, but not submit.
        ops = bus(directory, "ops", ["flops/v1/#"])
        try:
            assert set(deliveries(ops, mine[-1])) >= {f"{C}/bob/projects/p-b/state", mine[-1]}
            ops.publish_wait(f"{C}/bob/projects/p-b/cancel", b"{}")
            with pytest.raises(PublishFailed, match="refused"):
                ops.publish_wait(f"{C}/bob/requests", b"{}")
        finally:
            ops.close()
    finally:
        for b in (manager, alice, greedy):
            b.close()


def test_agents_are_isolated_and_the_manager_may_do_its_job(deployment: tuple[Path, Path]) -> None:
    directory, _ = deployment
    manager = bus(directory, "manager", [f"{A}/+/status", f"{A}/+/reports", f"{A}/+/receipts", "flops/v1/errors"])
    node1 = bus(directory, "node-1", [f"{A}/node-1/commands", f"{A}/node-1/acks", f"{A}/node-2/commands"])
    try:
        manager.publish_wait(f"{A}/node-2/commands", b"for node-2")
        manager.publish_wait(f"{A}/node-1/acks", b"{}")
        manager.publish_wait(f"{A}/node-1/commands", b"for node-1")
        assert deliveries(node1, f"{A}/node-1/commands") == [f"{A}/node-1/acks", f"{A}/node-1/commands"]
        manager.publish_wait("flops/v1/manager/status", b'{"online": true}', retain=True)
        manager.publish_wait("flops/v1/errors", b"{}")
        manager.publish_wait("flops/v1/clients/manager/marker/m", b"end")
        # node-1 speaks for itself only.
        node1.publish_wait(f"{A}/node-1/status", b"{}", retain=True)
        node1.publish_wait(f"{A}/node-1/reports", b"{}")
        node1.publish_wait(f"{A}/node-1/receipts", b"{}")
        expected = ["flops/v1/errors", f"{A}/node-1/status", f"{A}/node-1/reports", f"{A}/node-1/receipts"]
        assert deliveries(manager, f"{A}/node-1/receipts") == expected
        for forged in [
            f"{A}/node-2/reports",
            f"{A}/node-2/status",
            f"{A}/node-2/receipts",
            f"{A}/node-1/commands",
            f"{A}/node-1/acks",
            f"{C}/alice/projects/p-a/state",
            f"{C}/alice/requests",
        ]:
            with pytest.raises(PublishFailed, match="refused"):
                node1.publish_wait(forged, b"{}")
    finally:
        node1.publish_wait(f"{A}/node-1/status", b"", retain=True)
        node1.close()
        manager.close()


def _cli(directory: Path, name: str, *args: str) -> subprocess.Popen[str]:
    """The real CLI with nothing but the identity's env file (no flags, no other FLOPS_* variables)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOPS_")} | env_of(directory, name)
    env["PYTHONPATH"] = str(REPO_ROOT)
    command = [sys.executable, "-m", "flops.cli", *args]
    return subprocess.Popen(command, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_the_cli_and_the_agent_run_on_nothing_but_their_env_file(deployment: tuple[Path, Path]) -> None:
    """Before: both ignored FLOPS_BROKER_CA_FILE (exit 69, CERTIFICATE_VERIFY_FAILED)."""
    directory, _ = deployment
    agent = _cli(directory, "node-1", "agent", "--id", "node-1", "--data-dir", str(directory.parent / "node-1"))
    try:
        deadline = time.monotonic() + 60
        while True:
            # An operator's view: agents' statuses carry data-server addresses no customer may read.
            lister = _cli(directory, "ops", "agents", "--json")
            out, err = lister.communicate(timeout=60)
            assert lister.returncode == 0, err
            online = [AgentStatus.model_validate(a) for a in json.loads(out) if a["online"]]
            if [a.agent_id for a in online] == ["node-1"]:
                break
            assert agent.poll() is None, agent.communicate()[1]
            assert time.monotonic() < deadline, f"node-1 never came online: {out} {agent.stderr}"
            time.sleep(0.5)
    finally:
        agent.terminate()
        agent.communicate(timeout=30)


def test_add_customer_keeps_the_ca_and_existing_passwords(tmp_path: Path) -> None:
    directory = tmp_path / "flops"
    setup_production(directory, "--agents", "node-1", "--customers", "alice", "--port", str(free_port()))
    kept = {f: (directory / f).read_bytes() for f in ["ca.crt", "ca.key", "broker.crt", "env/alice.env"]}
    alice_hash = next(line for line in (directory / "passwd").read_text().splitlines() if line.startswith("alice:"))
    with mosquitto(directory) as broker:
        setup_production(
            directory, "--add-customer", "carol", "--add-agent", "node-3", "--agent-host", "node-3=10.1.2.3"
        )
        with pytest.raises(BrokerUnavailable):
            bus(directory, "carol")
        # As deploy/README.md says: SIGHUP makes Mosquitto re-read the password file and the ACL.
        broker.send_signal(signal.SIGHUP)
        carol = wait_until(lambda: _connects(directory, "carol"), 10, "carol accepted after SIGHUP")
        carol.publish_wait(f"{C}/carol/requests", b"{}")
        carol.close()
        for name in ("alice", "node-3"):
            bus(directory, name).close()
    assert {f: (directory / f).read_bytes() for f in kept} == kept
    passwd = (directory / "passwd").read_text().splitlines()
    assert alice_hash in passwd
    assert [line.split(":")[0] for line in passwd] == ["manager", "node-1", "alice", "node-3", "carol"]
    assert "user carol\n" in (directory / "acl").read_text()
    assert list(json.loads((directory / "agents.json").read_text())["agents"]) == ["node-1", "node-3"]
    assert "--host 10.1.2.3" in (directory / "env" / "node-3.env").read_text()


def _connects(directory: Path, name: str) -> Bus | None:
    try:
        return bus(directory, name)
    except BrokerUnavailable:
        return None


@pytest.mark.parametrize(
    ("args", "fields"),
    [
        (["--agents", "node/1,ok", "--customers", "a+b"], ["agents[0]", "customers[0]"]),
        (
            ["--agents", "node-1", "--customers", "manager,node-1,bob,bob"],
            ["customers[0]", "customers[1]", "customers[3]"],
        ),
        (["--agents", "n1,n1"], ["agents[1]"]),
        (["--agents", "n1", "--agent-roles", "n1=learner,chef", "--agent-host", "n2=1.2.3.4"], ["agent_host[n2]"]),
        (["--agents", "n1", "--customers", "has space", "--host", "bad host"], ["customers[0]", "host"]),
    ],
)
def test_bad_names_are_refused_and_nothing_is_written(tmp_path: Path, args: list[str], fields: list[str]) -> None:
    directory = tmp_path / "flops"
    result = CliRunner().invoke(app, ["setup", "production", "--dir", str(directory), *args])
    assert result.exit_code == 2, result.output
    for field in fields:
        assert f"  {field}: " in result.output, result.output
    assert not directory.exists()


def test_adding_an_existing_name_changes_nothing(tmp_path: Path) -> None:
    directory = tmp_path / "flops"
    setup_production(directory, "--agents", "node-1", "--customers", "alice", "--port", str(free_port()))
    before = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    for args in (["--add-customer", "node-1"], ["--add-agent", "alice"], ["--add-operator", "manager"]):
        result = CliRunner().invoke(app, ["setup", "production", "--dir", str(directory), *args])
        assert result.exit_code == 2 and "collides" in result.output, result.output
    result = CliRunner().invoke(app, ["setup", "production", "--dir", str(directory), "--agents", "x"])
    # The console wraps long lines (a long temp path moves the break): compare the words.
    assert result.exit_code == 2 and "already holds a setup" in " ".join(result.output.split()), result.output
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before


def test_the_shipped_example_acl_is_what_the_generator_writes() -> None:
    """mosquitto/acl is documentation that must not drift from the code: the generator's output for its names."""
    layout = setup.Layout(
        agents={"node-1": setup.AgentSpec(), "node-2": setup.AgentSpec()}, customers=("alice",), operators=("ops",)
    )
    shipped = Path(__file__).resolve().parent.parent / "mosquitto" / "acl"
    assert shipped.read_text() == setup.acl(layout)
