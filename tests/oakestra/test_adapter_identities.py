"""The Oakestra adapter with a dynamic-security admin, between a real Mosquitto with the plugin and the fake System
Manager: each project's services get their own broker identity, which reports as the project's seats through the
shim and nothing else, dies with the project's application, and survives an adapter restart; identities of
projects an earlier adapter left without an application are deleted."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.errors import BrokerUnavailable, PublishFailed
from flops.messages import new_id
from flops.oakestra import dynsec
from flops.oakestra.actors import ActorConfig
from flops.oakestra.adapter import AdapterConfig, OakestraAdapter
from flops.oakestra.client import SystemManager
from flops.oakestra.deploy import application_name
from flops.oakestra.dynsec import DynSec
from flops.oakestra.fake import FakeSystemManager
from flops.oakestra.identities import ActorIdentities
from flops.oakestra.shim import Identity, Reporter
from tests.oakestra.dynsec_support import DynsecBroker
from tests.oakestra.support import FakeControl
from tests.oakestra.test_adapter import TIMING, WAIT, ManagerSide, posted_services, run_aggregator
from tests.support import wait_until

SHARED = ("shared-actor", "shared-password")  # the fallback identity: never given out while dynsec is configured


@pytest.fixture
def cluster(control: FakeControl) -> str:
    name = f"core{uuid.uuid4().hex[:8]}"
    control.clusters([{"cluster_name": name, "supported_addons": []}])
    return name


def start_adapter(broker: DynsecBroker, url: str, state_dir: Path) -> OakestraAdapter:
    config = AdapterConfig(
        actors=ActorConfig(broker_url=broker.address().url, broker_username=SHARED[0], broker_password=SHARED[1]),
        state_dir=state_dir,
        timing=TIMING,
        client_id=new_id("test-oakestra"),
    )
    identities = ActorIdentities(DynSec(broker.admin, timeout_s=WAIT))
    return OakestraAdapter(SystemManager(url, timeout=5), broker.manager, config, identities=identities).start()


def service_env(control: FakeControl, project: str) -> dict[str, str]:
    [service] = [
        s["body"]["applications"][0]["microservices"][0]
        for s in posted_services(control)
        if s["body"]["applications"][0]["application_name"] == application_name(project)
    ]
    return dict(e.split("=", 1) for e in service["environment"])


def connect_as(env: dict[str, str]) -> Bus:
    return Bus(Identity.from_env(env).broker, BusOptions(client_id=new_id("actor"))).connect()


def test_each_projects_actors_report_with_their_own_identity_until_the_project_ends(
    dynsec_broker: DynsecBroker, fake: FakeSystemManager, control: FakeControl, cluster: str, tmp_path: Path
) -> None:
    seat = f"oak-{cluster}"
    side = ManagerSide(dynsec_broker.manager, cluster)
    adapter = start_adapter(dynsec_broker, fake.url, tmp_path / "oakestra")
    try:
        first, second = new_id("p"), new_id("p")
        cmd = run_aggregator(side, seat, first)
        run_aggregator(side, seat, second)
        wait_until(lambda: len(posted_services(control)) == 2, WAIT, "both aggregators placed")
        env, other = service_env(control, first), service_env(control, second)

        assert env["FLOPS_BROKER_USERNAME"] == dynsec.username(first) != other["FLOPS_BROKER_USERNAME"]
        assert env["FLOPS_BROKER_PASSWORD"] not in (other["FLOPS_BROKER_PASSWORD"], SHARED[1])
        # The shim reports with what its service was given, as the seat its command went to.
        reporter_bus = connect_as(env)
        reporter = Reporter(Identity.from_env(env), reporter_bus)
        reporter.send("aggregator.started", {"address": "10.30.0.1:19100"}, f"{cmd.command_id}.r1")
        got: dict[str, Any] = side.report(cmd.command_id, "aggregator.started")
        assert got["project_id"] == first and got["source"] == f"oakestra/{seat}"
        with pytest.raises(PublishFailed, match="Not authorized"):
            reporter_bus.publish_wait(topics.agent_reports("oak-elsewhere"), b"{}", timeout=WAIT)
        with pytest.raises(PublishFailed, match="Not authorized"):
            reporter_bus.publish_wait(topics.agent_commands(seat), b"{}", timeout=WAIT)
        reporter_bus.close()

        stop = side.command(seat, first, "stop_project", keep=[])
        side.receipt(seat, stop.command_id)
        wait_until(lambda: first not in adapter.placements, WAIT, "the first project's application deleted")
        wait_until(lambda: _refused(env), WAIT, "the first project's identity to stop working")
        connect_as(other).close()  # the other project's actors still report
    finally:
        adapter.stop()
        side.close()


def test_a_restarted_adapter_keeps_the_identities_of_adopted_projects_and_deletes_the_rest(
    dynsec_broker: DynsecBroker, fake: FakeSystemManager, control: FakeControl, cluster: str, tmp_path: Path
) -> None:
    seat = f"oak-{cluster}"
    side = ManagerSide(dynsec_broker.manager, cluster)
    adapter = start_adapter(dynsec_broker, fake.url, tmp_path / "oakestra")
    project = new_id("p")
    try:
        run_aggregator(side, seat, project)
        wait_until(lambda: project in adapter.placements and not adapter.placements[project].pending(), WAIT, "run")
    finally:
        adapter.stop()  # the manager dies: its actors keep running, and keep reporting
    env = service_env(control, project)
    admin = DynSec(dynsec_broker.admin, client_id=new_id("admin"), timeout_s=WAIT).connect()
    try:
        admin.ensure_project("gone", dynsec.new_password())  # left by a project whose application went meanwhile
        again = start_adapter(dynsec_broker, fake.url, tmp_path / "oakestra-2")
        try:
            assert again.adopted.wait(WAIT) and project in again.placements
            assert admin.projects() == [project]
            actor = connect_as(env)
            actor.publish_wait(topics.agent_reports(seat), b"{}", timeout=WAIT)
            actor.close()
        finally:
            again.stop()
    finally:
        admin.close()
        side.close()


def _refused(env: dict[str, str]) -> bool:
    try:
        connect_as(env).close()
    except BrokerUnavailable:
        return True
    return False
