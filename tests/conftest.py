"""Shared fixtures: a real MQTT broker (a Mosquitto container when a Docker engine answers, else a local
Mosquitto process on a free port), settings pointing at it, and the test-side workers."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from flops.broker import MosquittoBroker
from flops.settings import BrokerAddress
from tests.browser_support import browser, page  # noqa: F401  (one headless Chromium per run)
from tests.image_support import builder_image, built, registry  # noqa: F401  (one registry and image build per run, shared)
from tests.support import FakeWorkers, ManagerProcess


@pytest.fixture(scope="session")
def _structlog_defaults() -> dict[str, Any]:
    return dict(structlog.get_config())


@pytest.fixture(autouse=True)
def _structlog_restored(_structlog_defaults: dict[str, Any]) -> Iterator[None]:
    """A test or module fixture that runs the CLI in-process (typer's CliRunner) configures structlog for the
    whole process, caching loggers on first use with its processor list: a later ``capture_logs`` (which
    edits the current list) would miss what they log. Every test ends with the configuration the run began
    with (session scope: a module fixture's change happens before a test's own fixtures start)."""
    yield
    structlog.configure(**_structlog_defaults)


def _docker_broker() -> contextlib.AbstractContextManager[BrokerAddress] | None:
    """A Mosquitto container, or None when no Docker engine is reachable (the usual case here)."""
    try:
        import docker

        docker.from_env(timeout=2).ping()
    except Exception:
        return None

    @contextlib.contextmanager
    def run() -> Iterator[BrokerAddress]:
        from testcontainers.core.container import DockerContainer
        from testcontainers.core.waiting_utils import wait_for_logs

        conf = Path(__file__).parent / "fixtures" / "mosquitto-container.conf"
        with (
            DockerContainer("eclipse-mosquitto:2")
            .with_exposed_ports(1883)
            .with_volume_mapping(str(conf), "/mosquitto/config/mosquitto.conf") as container
        ):
            wait_for_logs(container, "running", timeout=30)
            yield BrokerAddress(host=container.get_container_host_ip(), port=int(container.get_exposed_port(1883)))

    return run()


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerAddress]:
    container = _docker_broker()
    if container is not None:
        with container as address:
            yield address
        return
    if not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists()):
        pytest.fail("no Docker engine and no mosquitto binary: run the README's test command, which installs it")
    running = MosquittoBroker()
    try:
        yield running.address
    finally:
        running.stop()


@pytest.fixture
def workers(broker: BrokerAddress) -> Iterator[FakeWorkers]:
    fake = FakeWorkers(broker)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def manager(broker: BrokerAddress, tmp_path: Path) -> Iterator[ManagerProcess]:
    proc = ManagerProcess(broker, tmp_path / "manager")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
