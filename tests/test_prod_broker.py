"""The production broker config we ship (mosquitto/prod.conf + acl) really runs: TLS only, no anonymous
access, passwords checked, agents cannot read each other's commands nor publish as another agent, and the
manager may publish everything it must (its refused birth went unnoticed before PUBACK codes were read)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from flops import topics
from flops.broker import free_port, wait_for_port
from flops.bus import Bus, BusOptions
from flops.client import Client
from flops.errors import BrokerUnavailable, PublishFailed
from flops.manager import Manager
from flops.messages import ReportAck, new_id
from flops.settings import BrokerAddress, Settings
from flops.sla import ProjectSLA
from flops.store_memory import MemoryStore
from tests.certs import fleet_certificates
from tests.support import REPO_ROOT, sla

USERS = {"manager": "m-secret", "node-1": "n1-secret", "node-2": "n2-secret", "alice": "a-secret"}


@pytest.fixture
def prod_broker(tmp_path: Path):
    etc = tmp_path / "etc"
    etc.mkdir()
    fleet_certificates(etc, cert="server.crt", key="server.key")
    shutil.copy(REPO_ROOT / "mosquitto" / "acl", etc / "acl")
    passwd = etc / "passwd"
    for i, (user, password) in enumerate(USERS.items()):
        flags = ["-c"] if i == 0 else []
        subprocess.run(["mosquitto_passwd", *flags, "-b", str(passwd), user, password], check=True, timeout=30)
    port = free_port()
    conf = (REPO_ROOT / "mosquitto" / "prod.conf").read_text()
    conf = conf.replace("/etc/mosquitto/flops/", f"{etc}/").replace("listener 8883", f"listener {port} 127.0.0.1")
    conf = conf.replace("persistence_location /var/lib/mosquitto/", f"persistence_location {tmp_path}/")
    conf = conf.replace("log_dest syslog", "log_dest stderr")
    # The shipped config expects files owned by the mosquitto user; tests run as whoever they run as.
    conf += (
        "\nuser root\n" if subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0" else ""
    )
    (tmp_path / "mosquitto.conf").write_text(conf)
    log = (tmp_path / "mosquitto.log").open("wb")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(tmp_path / "mosquitto.conf")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port("127.0.0.1", port, 10, proc)  # type: ignore[arg-type]
        yield port, str(etc / "ca.crt")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _address(port: int, user: str | None) -> BrokerAddress:
    return BrokerAddress(host="127.0.0.1", port=port, tls=True, username=user, password=USERS.get(user or ""))


def test_tls_passwords_and_acl_of_the_shipped_production_config(prod_broker, tmp_path: Path) -> None:
    port, ca = prod_broker
    with pytest.raises(BrokerUnavailable):
        Bus(_address(port, None), BusOptions(client_id=new_id("anon"), ca_file=ca)).connect(timeout=5)
    wrong = _address(port, "alice").model_copy(update={"password": "guess"})
    with pytest.raises(BrokerUnavailable):
        Bus(wrong, BusOptions(client_id=new_id("guess"), ca_file=ca)).connect(timeout=5)

    settings = Settings(data_dir=tmp_path / "m", broker_ca_file=Path(ca))
    manager = Manager(settings, MemoryStore(), _address(port, "manager"), client_id="manager").start()
    node1 = Bus(
        _address(port, "node-1"),
        BusOptions(
            client_id="node-1",
            ca_file=ca,
            subscriptions=[topics.agent_commands("node-1"), topics.agent_commands("node-2")],
        ),
    ).connect()
    node2 = Bus(
        _address(port, "node-2"),
        BusOptions(client_id="node-2", ca_file=ca, subscriptions=[topics.agent_commands("node-2")]),
    ).connect()
    try:
        # A user submits and reads state over TLS with a password.
        with Client(_address(port, "alice"), ca_file=ca) as client:
            # No customerID in the SLA: the manager fills in the authenticated user.
            body = {k: v for k, v in sla("file:///nowhere").items() if k != "customerID"}
            reply = client.submit(ProjectSLA.model_validate(body))
            assert reply.project_id and not reply.errors
            state = client.state(reply.project_id)
            assert state.project_id == reply.project_id and state.customer == "alice"
            # One naming another customer is refused with a field error.
            refused = client.submit(ProjectSLA.model_validate(sla("file:///nowhere") | {"customerID": "bob"}))
            assert refused.errors and refused.errors[0].field == "sla.customerID"
        # The manager writes node-2's commands, then node-1's: node-1 gets its own, never node-2's.
        manager.bus.publish_wait(topics.agent_commands("node-2"), b"for node-2")
        manager.bus.publish_wait(topics.agent_commands("node-1"), b"for node-1")
        assert node2.inbox.get(timeout=10).payload == b"for node-2"
        assert node1.inbox.get(timeout=10).payload == b"for node-1"
        assert node1.inbox.empty()
        # The manager may publish its own retained status (birth / last will) and acknowledge reports.
        manager.bus.publish_wait(topics.manager_status(), b'{"online": true}', retain=True)
        manager.bus.publish_wait(topics.agent_acks("node-1"), ReportAck(event_ids=["e-1"]).to_bytes())
        # An agent reports and receipts on its own topics only; the broker refuses the rest (PUBACK >= 0x80).
        node1.publish_wait(topics.agent_reports("node-1"), b"{}")
        node1.publish_wait(topics.agent_receipts("node-1"), b"{}")
        for forged in (topics.agent_reports("node-2"), topics.agent_status("node-2"), topics.requests("alice")):
            with pytest.raises(PublishFailed, match="refused"):
                node1.publish_wait(forged, b"{}")
    finally:
        node1.close()
        node2.close()
        manager.stop()
