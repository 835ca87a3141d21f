"""Real-browser tests of the playground: Playwright drives the system's Chromium (no browser download).

They are marked `browser` and skip, saying why, when Playwright or a Chromium binary is missing. Chromium is
looked up as $CNN_CHROMIUM, then `chromium`, `chromium-browser`, `google-chrome` on the PATH (Debian:
`apt-get install chromium`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium executable to drive, or None."""
    explicit = os.environ.get("CNN_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def why_no_browser() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (it is in the dev extra: make install)"
    if find_chromium() is None:
        return ("no Chromium executable found (apt-get install chromium, or set CNN_CHROMIUM=/path/to/chromium); "
                "the browser tests of the playground did not run")
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives the playground in a real Chromium (skipped without one)")


BROWSER_TESTS: set[str] = set()  # node ids of the collected tests marked `browser` (for the closing summary)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = why_no_browser()
    skip = pytest.mark.skip(reason=reason or "")
    for item in items:
        if item.get_closest_marker("browser") is not None:
            BROWSER_TESTS.add(item.nodeid)
            if reason is not None:
                item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say at the end of the run whether the browser tests ran, and if not why."""
    if not BROWSER_TESTS:
        return
    reason = why_no_browser()
    if reason is not None:
        terminalreporter.write_line(f"BROWSER TESTS SKIPPED ({len(BROWSER_TESTS)}): {reason}", yellow=True, bold=True)
        return
    passed = sum(r.nodeid in BROWSER_TESTS for r in terminalreporter.stats.get("passed", []))
    terminalreporter.write_line(f"browser tests: {passed} of {len(BROWSER_TESTS)} passed in {find_chromium()}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium per module: Playwright's sync API runs an event loop in this thread while it is
    open, so it must be closed before other modules' tests call asyncio.run()."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    assert executable is not None
    with sync_playwright() as pw:
        # --no-sandbox: CI and containers run as root, where Chromium's sandbox refuses to start
        b = pw.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()
