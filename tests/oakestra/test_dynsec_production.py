"""The broker `flops setup production` writes, with the dynamic-security plugin added as mosquitto/README.md says:
its password-file identities keep their ACL over TLS, and an actor identity made through the plugin's admin
reports as its seat only, until its project is deleted."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.errors import BrokerUnavailable, PublishFailed
from flops.messages import Command, new_id
from flops.oakestra import dynsec, dynsec_files
from flops.oakestra.actors import Refusal, actor_spec
from flops.oakestra.adapter import from_settings
from flops.oakestra.dynsec import DynSec
from flops.oakestra.seats import Seat
from flops.ports import free_port
from flops.settings import BrokerAddress, Settings
from tests.oakestra.support import run_shim
from tests.prod_support import bus, env_of, mosquitto, setup_production

WAIT = 10.0
CUSTOMERS = "flops/v1/customers"
IMAGES = {"kind": "image", "images": {"aggregator": "reg/p-aggregator:abc"}}
SPEC = {"artifact": {"details": IMAGES}, "port": 19100, "rounds": 1}
SPEC |= {"min_available_clients": 1, "min_fit_clients": 1, "min_evaluate_clients": 1}


def _actor(address: BrokerAddress, ca_file: str | None, project_id: str, password: str) -> Bus:
    who = address.model_copy(update={"username": dynsec.username(project_id), "password": password})
    return Bus(who, BusOptions(client_id=new_id("actor"), ca_file=ca_file)).connect(WAIT)


@dataclass
class Plugged:
    """The production broker with the plugin: its directory, the address and TLS files of the manager's
    settings, the plugin admin's login."""

    directory: Path
    settings: Settings
    address: BrokerAddress
    tls: dict[str, str | None]
    admin_env: dict[str, str]


@pytest.fixture
def plugged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Plugged:
    plugin = dynsec_files.plugin_path()
    if plugin is None:
        pytest.skip("mosquitto's dynamic-security plugin is not installed")
    directory = tmp_path / "flops"
    setup_production(directory, "--agents", "node-1,node-2", "--customers", "alice", "--port", str(free_port()))
    assert dynsec_files.main([str(directory)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert printed == dynsec_files.config_lines(directory.resolve() / "dynamic-security.json", plugin).splitlines()
    conf = directory / "mosquitto.conf"
    conf.write_text(conf.read_text() + "\n".join(printed) + "\n")
    manager_settings = Settings(
        **{k.removeprefix("FLOPS_").lower(): v for k, v in env_of(directory, "manager").items()}
    )
    return Plugged(
        directory,
        manager_settings,
        manager_settings.broker(),
        manager_settings.broker_tls_files(),
        env_of(directory, "oakestra-dynsec"),
    )


def _admin(plugged: Plugged) -> DynSec:
    admin_address = plugged.address.model_copy(
        update={
            "username": plugged.admin_env["FLOPS_OAKESTRA_DYNSEC_USERNAME"],
            "password": plugged.admin_env["FLOPS_OAKESTRA_DYNSEC_PASSWORD"],
        }
    )
    return DynSec(admin_address, tls=plugged.tls, timeout_s=WAIT).connect()


def test_the_production_broker_with_the_plugin_keeps_its_acl_and_binds_actor_identities(plugged: Plugged) -> None:
    directory, address, tls = plugged.directory, plugged.address, plugged.tls
    with mosquitto(directory):
        manager = bus(directory, "manager", [topics.ALL_AGENT_REPORTS])
        node = bus(directory, "node-1")
        admin = _admin(plugged)
        try:
            node.publish_wait(topics.agent_reports("node-1"), b"{}", timeout=WAIT)  # the ACL file still applies
            with pytest.raises(PublishFailed, match="Not authorized"):
                node.publish_wait(topics.agent_reports("node-2"), b"{}", timeout=WAIT)
            password = dynsec.new_password()
            admin.ensure_project("p1", password)
            admin.allow_seat("p1", "oak-a")
            actor = _actor(address, tls.get("ca_file"), "p1", password)  # TLS, the CA only: no client certificate
            actor.publish_wait(topics.agent_reports("oak-a"), b'{"from": "actor"}', timeout=WAIT)
            refused = (topics.agent_reports("node-1"), topics.agent_commands("node-1"), f"{CUSTOMERS}/alice/requests")
            for topic in refused:
                with pytest.raises(PublishFailed, match="Not authorized"):
                    actor.publish_wait(topic, b"{}", timeout=WAIT)
            seen = [manager.inbox.get(timeout=WAIT) for _ in range(2)]
            assert [(m.topic, m.payload) for m in seen][-1] == (topics.agent_reports("oak-a"), b'{"from": "actor"}')
            actor.close()
            admin.delete_project("p1")
            with pytest.raises(BrokerUnavailable):
                _actor(address, tls.get("ca_file"), "p1", password)
        finally:
            admin.close()
            node.close()
            manager.close()


def test_an_actor_the_adapter_configures_reports_over_the_tls_broker_with_the_ca_in_its_environment(
    plugged: Plugged, tmp_path: Path
) -> None:
    """The actor's image has no fleet CA: the adapter hands the manager's CA to it in the service environment,
    and the real shim verifies the broker with it, as its project's identity."""
    settings = plugged.settings.model_copy(update={"deployer": "oakestra", "oakestra_url": "http://127.0.0.1:1"})
    config = from_settings(settings, plugged.address).config.actors
    assert config.broker_ca_pem == Path(str(plugged.tls["ca_file"])).read_text()
    seat = "oak-tls"
    cmd = Command(command_id=new_id("c"), project_id="p1", agent_id=seat, kind="run_aggregator", spec=SPEC)
    spec = actor_spec(cmd, Seat(seat, "cluster-1", ("aggregator",)), config)
    assert not isinstance(spec, Refusal), spec
    script = [["aggregator.started", {"address": "0.0.0.0:19100"}], ["training.failed", {"reason": "scripted"}]]
    with mosquitto(plugged.directory):
        manager = bus(plugged.directory, "manager", [topics.agent_reports(seat)])
        admin = _admin(plugged)
        try:
            password = dynsec.new_password()
            admin.ensure_project("p1", password)
            admin.allow_seat("p1", seat)
            env = {**spec.env, "FLOPS_BROKER_USERNAME": dynsec.username("p1"), "FLOPS_BROKER_PASSWORD": password}
            code = run_shim(env, script, tmp_path)
            got = [json.loads(manager.inbox.get(timeout=WAIT).payload) for _ in script]
        finally:
            admin.close()
            manager.close()
    assert code == 0
    assert [r["kind"] for r in got] == ["aggregator.started", "training.failed"]
    assert got[0]["address"].startswith("10.30.")  # the service IP the adapter gave it
