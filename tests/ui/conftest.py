"""Fixtures of the web-view tests: ``flops ui`` as a real process, and where screenshots go
(``FLOPS_TEST_ARTIFACTS``, default ``.test-artifacts/`` in the checkout). The headless Chromium (``browser``,
``page``) is one per run for every test that needs it: ``tests/browser_support.py``, registered in
``tests/conftest.py``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from flops.settings import BrokerAddress
from tests.support import REPO_ROOT
from tests.ui.support import UiProc


@pytest.fixture(scope="session")
def ui(broker: BrokerAddress, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiProc]:
    """``flops ui`` on the session's broker (development: no login)."""
    proc = UiProc(tmp_path_factory.mktemp("ui"), {"FLOPS_BROKER_URL": broker.url}).start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    path = Path(os.environ.get("FLOPS_TEST_ARTIFACTS") or REPO_ROOT / ".test-artifacts") / "ui"
    path.mkdir(parents=True, exist_ok=True)
    return path
