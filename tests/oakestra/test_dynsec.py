"""Per-project actor identities on a real Mosquitto with the dynamic-security plugin: a project's actors may
publish the reports of the seats its commands went to and nothing else, lose the broker when the project ends,
and no two projects share an identity."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flops import topics
from flops.bus import Bus, BusOptions
from flops.errors import BrokerUnavailable, PublishFailed
from flops.messages import new_id
from flops.oakestra import dynsec, dynsec_files
from tests.oakestra.dynsec_support import DynsecBroker

WAIT = 10.0


@pytest.fixture
def admin(dynsec_broker: DynsecBroker) -> Iterator[dynsec.DynSec]:
    client = dynsec.DynSec(dynsec_broker.admin, timeout_s=WAIT).connect()
    yield client
    client.close()


def _actor(broker: DynsecBroker, project_id: str, password: str) -> Bus:
    return Bus(broker.address(dynsec.username(project_id), password), BusOptions(client_id=new_id("actor"))).connect()


def test_a_projects_identity_publishes_its_seats_reports_and_nothing_else(
    dynsec_broker: DynsecBroker, admin: dynsec.DynSec
) -> None:
    password = dynsec.new_password()
    admin.ensure_project("p1", password)
    admin.allow_seat("p1", "oak-a")
    manager = Bus(
        dynsec_broker.manager, BusOptions(client_id=new_id("manager"), subscriptions=[topics.ALL_AGENT_REPORTS])
    ).connect()
    actor = _actor(dynsec_broker, "p1", password)
    try:
        actor.publish_wait(topics.agent_reports("oak-a"), b'{"n": 1}', timeout=WAIT)
        got = manager.inbox.get(timeout=WAIT)
        assert (got.topic, json.loads(got.payload)) == (topics.agent_reports("oak-a"), {"n": 1})
        # Under MQTT 5 Mosquitto answers a refused QoS 1 publish with PUBACK reason "Not authorized" (0x87).
        for topic in (
            topics.agent_reports("oak-b"),  # a seat this project's commands did not go to
            topics.agent_commands("oak-a"),  # commands are the manager's
            topics.agent_status("oak-a"),  # seats are announced by the adapter
            "flops/v1/customers/c/requests",
            dynsec.CONTROL_TOPIC,  # it cannot grant itself more
        ):
            with pytest.raises(PublishFailed, match="Not authorized"):
                actor.publish_wait(topic, b"{}", timeout=WAIT)
        with pytest.raises(queue.Empty):
            manager.inbox.get(timeout=0.5)  # nothing refused reached a subscriber
    finally:
        actor.close()
        manager.close()


def test_an_identity_stops_working_when_its_project_is_deleted(
    dynsec_broker: DynsecBroker, admin: dynsec.DynSec
) -> None:
    password = dynsec.new_password()
    admin.ensure_project("p1", password)
    admin.allow_seat("p1", "oak-a")
    actor = _actor(dynsec_broker, "p1", password)
    admin.delete_project("p1")
    admin.delete_project("p1")  # again: already gone is fine (a retried stop)
    deadline = time.monotonic() + WAIT
    while actor.connected and time.monotonic() < deadline:  # the plugin disconnects the deleted client's sessions
        time.sleep(0.02)  # polling paho's state, which has no event to wait on
    assert not actor.connected
    actor.close()
    with pytest.raises(BrokerUnavailable, match=r"Not authorized|Bad user name or password"):
        _actor(dynsec_broker, "p1", password)
    assert admin.projects() == []


def test_two_projects_get_different_identities(dynsec_broker: DynsecBroker, admin: dynsec.DynSec) -> None:
    first, second = dynsec.new_password(), dynsec.new_password()
    assert first != second and len(first) >= 32  # 24 random bytes, URL-safe base64
    admin.ensure_project("p1", first)
    admin.ensure_project("p2", second)
    admin.allow_seat("p1", "oak-a")
    admin.allow_seat("p2", "oak-b")
    assert admin.projects() == ["p1", "p2"]
    with pytest.raises(BrokerUnavailable):
        _actor(dynsec_broker, "p2", first)
    actor = _actor(dynsec_broker, "p1", first)
    try:
        with pytest.raises(PublishFailed, match="Not authorized"):
            actor.publish_wait(topics.agent_reports("oak-b"), b"{}", timeout=WAIT)
    finally:
        actor.close()


def test_ensure_project_again_keeps_the_identity_and_gives_it_the_password(
    dynsec_broker: DynsecBroker, admin: dynsec.DynSec
) -> None:
    """A restarted adapter re-creates what it adopted with the password the project's services hold."""
    password = dynsec.new_password()
    admin.ensure_project("p1", dynsec.new_password())
    admin.allow_seat("p1", "oak-a")
    admin.ensure_project("p1", password)
    admin.allow_seat("p1", "oak-a")
    actor = _actor(dynsec_broker, "p1", password)
    try:
        actor.publish_wait(topics.agent_reports("oak-a"), b"{}", timeout=WAIT)
    finally:
        actor.close()


def test_the_admin_reaches_only_the_control_api(dynsec_broker: DynsecBroker) -> None:
    admin = Bus(dynsec_broker.admin, BusOptions(client_id=new_id("admin"))).connect()
    try:
        with pytest.raises(PublishFailed, match="Not authorized"):
            admin.publish_wait(topics.agent_reports("oak-a"), b"{}", timeout=WAIT)
    finally:
        admin.close()


def test_the_password_file_identities_keep_their_acl(dynsec_broker: DynsecBroker) -> None:
    manager = Bus(dynsec_broker.manager, BusOptions(client_id=new_id("manager"))).connect()
    try:
        manager.publish_wait(topics.agent_commands("oak-a"), b"{}", timeout=WAIT)
        with pytest.raises(PublishFailed, match="Not authorized"):
            manager.publish_wait(dynsec.CONTROL_TOPIC, b"{}", timeout=WAIT)
    finally:
        manager.close()


def test_the_first_state_is_written_once_with_the_managers_settings(tmp_path: Path) -> None:
    assert dynsec_files.main([str(tmp_path)]) == 0
    state, env = tmp_path / "dynamic-security.json", tmp_path / "env" / "oakestra-dynsec.env"
    assert (state.stat().st_mode & 0o777, env.stat().st_mode & 0o777) == (0o600, 0o600)
    settings = dict(line.split("=", 1) for line in env.read_text().splitlines())
    [admin] = json.loads(state.read_text())["clients"]
    assert admin["username"] == settings["FLOPS_OAKESTRA_DYNSEC_USERNAME"]
    assert settings["FLOPS_OAKESTRA_DYNSEC_PASSWORD"] not in state.read_text()
    assert dynsec_files.main([str(tmp_path)]) == 1  # never replaced: the broker's clients would be lost
