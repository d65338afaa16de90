"""Fixtures of the Oakestra tests: a fake System Manager on a free port, its control client, a client of it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flops.oakestra.client import SystemManager
from flops.oakestra.fake import FakeSystemManager
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
