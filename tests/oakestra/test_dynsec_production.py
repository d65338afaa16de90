"""The broker `flops setup production` writes, with the dynamic-security plugin added as mosquitto/README.md says:
its password-file identities keep their ACL over TLS, and an actor identity made through the plugin's admin
reports as its seat only, until its project is deleted."""

from __future__ import annotations

from pathlib import Path

import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.errors import BrokerUnavailable, PublishFailed
from flops.messages import new_id
from flops.oakestra import dynsec, dynsec_files
from flops.oakestra.dynsec import DynSec
from flops.ports import free_port
from flops.settings import BrokerAddress, Settings
from tests.prod_support import bus, env_of, mosquitto, setup_production

WAIT = 10.0
CUSTOMERS = "flops/v1/customers"


def _actor(address: BrokerAddress, ca_file: str | None, project_id: str, password: str) -> Bus:
    who = address.model_copy(update={"username": dynsec.username(project_id), "password": password})
    return Bus(who, BusOptions(client_id=new_id("actor"), ca_file=ca_file)).connect(WAIT)


def test_the_production_broker_with_the_plugin_keeps_its_acl_and_binds_actor_identities(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
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
    address, tls = manager_settings.broker(), manager_settings.broker_tls_files()
    admin_env = env_of(directory, "oakestra-dynsec")

    with mosquitto(directory):
        manager = bus(directory, "manager", [topics.ALL_AGENT_REPORTS])
        node = bus(directory, "node-1")
        admin_address = address.model_copy(
            update={
                "username": admin_env["FLOPS_OAKESTRA_DYNSEC_USERNAME"],
                "password": admin_env["FLOPS_OAKESTRA_DYNSEC_PASSWORD"],
            }
        )
        admin = DynSec(admin_address, tls=tls, timeout_s=WAIT).connect()
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
