"""Fixtures of the web-view tests: one headless Chromium for the whole session (Debian's, driven by
Playwright's Python driver; no browser is downloaded), ``flops ui`` as a real process, and where screenshots
go (``FLOPS_TEST_ARTIFACTS``, default ``.test-artifacts/`` in the checkout)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from flops.settings import BrokerAddress
from tests.support import REPO_ROOT
from tests.ui.support import UiProc

CHROMIUM = os.environ.get("FLOPS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    playwright_api = pytest.importorskip("playwright.sync_api", reason="the test extra installs playwright")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: scripts/test.sh installs Debian's chromium package")
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    # Our Content-Security-Policy stays on: the pages must work under it (predicates are passed as functions).
    context = browser.new_context(viewport={"width": 1100, "height": 1300})  # type: ignore[attr-defined]
    try:
        yield context.new_page()
    finally:
        context.close()


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
