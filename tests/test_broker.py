"""The broker behind its interface: both embedded brokers carry what FLOps needs (MQTT 5, QoS 1, retained
messages, last will, response topics), and a manager works through the pip-installed fallback."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from flops.broker import IotcoreBroker, MosquittoBroker
from flops.bus import Bus, BusOptions, Will
from flops.client import Client
from flops.messages import new_id
from flops.sla import ProjectSLA
from tests.support import ManagerProcess, sla


@pytest.fixture(params=["mosquitto", "iotcore"])
def embedded(request):
    running = MosquittoBroker() if request.param == "mosquitto" else IotcoreBroker()
    yield running
    running.stop()


def _next(bus: Bus, timeout: float = 5.0):
    return bus.inbox.get(timeout=timeout)


def test_embedded_brokers_carry_retained_qos1_and_last_will(embedded) -> None:
    address = embedded.address
    with Bus(address, BusOptions(client_id=new_id("t-pub"))) as pub:
        pub.publish_wait("flops/v1/test/retained", b"kept", retain=True)
    dying = Bus(
        address, BusOptions(client_id=new_id("t-dying"), will=Will("flops/v1/test/will", b"gone", retain=True))
    ).connect()
    with Bus(address, BusOptions(client_id=new_id("t-sub"), subscriptions=["flops/v1/test/#"])) as sub:
        first = _next(sub)
        assert (first.topic, first.payload, first.retain) == ("flops/v1/test/retained", b"kept", True)
        dying.kill()  # no DISCONNECT: the broker must publish the will
        will = _next(sub, timeout=30)
        assert (will.topic, will.payload) == ("flops/v1/test/will", b"gone")
        with pytest.raises(queue.Empty):
            sub.inbox.get_nowait()


def test_manager_answers_through_the_iotcore_fallback(tmp_path: Path) -> None:
    running = IotcoreBroker()
    manager = ManagerProcess(running.address, tmp_path / "manager")
    try:
        manager.start()
        with Client(running.address) as client:
            reply = client.submit(ProjectSLA.model_validate(sla("file:///nowhere")))
            assert reply.project_id and not reply.errors
            state = client.state(reply.project_id)
        assert state.stage.value in {"preparation", "finished"}
    finally:
        manager.stop()
        running.stop()


def _settings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_development_broker_configs_all_come_from_dev_config() -> None:
    from flops.broker import dev_config

    root = Path(__file__).resolve().parent.parent
    assert _settings((root / "mosquitto" / "dev.conf").read_text()) == _settings(dev_config())
    container = (Path(__file__).parent / "fixtures" / "mosquitto-container.conf").read_text()
    assert _settings(container) == _settings(dev_config("1883", logging="log_dest stdout"))
