"""Fixtures of the Oakestra tests: a fake System Manager on a free port, its control client, a client of it, and a
Mosquitto with the dynamic-security plugin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flops.oakestra import dynsec_files
from flops.oakestra.client import SystemManager
from flops.oakestra.fake import FakeSystemManager
from tests.oakestra.dynsec_support import DynsecBroker
from tests.oakestra.support import FakeControl, VirtualClock


@pytest.fixture
def fake() -> Iterator[FakeSystemManager]:
    with FakeSystemManager() as running:
        yield running


@pytest.fixture
def control(fake: FakeSystemManager) -> Iterator[FakeControl]:
    ctl = FakeControl(fake.url)
    yield ctl
    ctl.close()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def sm(fake: FakeSystemManager, clock: VirtualClock) -> Iterator[SystemManager]:
    with SystemManager(fake.url, clock=clock.monotonic, timeout=5) as client:
        yield client


@pytest.fixture
def dynsec_broker(tmp_path: Path) -> Iterator[DynsecBroker]:
    if dynsec_files.plugin_path() is None:
        pytest.skip("mosquitto's dynamic-security plugin is not installed")
    running = DynsecBroker(tmp_path / "broker")
    yield running
    running.stop()
