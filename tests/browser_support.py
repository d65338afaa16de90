"""One headless Chromium per test run (Debian's, driven by Playwright's Python driver; no browser is
downloaded), shared by every test that drives a page: the web view's tests and the hierarchical one. One
definition for the whole run: a second ``sync_playwright()`` in the same thread would fail."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

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
