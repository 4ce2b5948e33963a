"""Headless Debian Chromium driven by Playwright (no browser download), for the console and
portal tests: the browser, a page that records script and CSP errors, screenshots at desktop
and phone widths under tests/artifacts/console/ (committed: the issue's closing note lists
them).

The browser: CHROMIUM_PATH (default /usr/bin/chromium), else `chromium` on PATH, else
Playwright's own download. `make test` provisions one first (scripts/provision-browser: Debian's
package when root, else `playwright install chromium`). Without any, the tests skip with the
reason, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.api import IN_CI

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, ViewportSize

CHROMIUM = Path(os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "console"
DESKTOP: ViewportSize = {"width": 1280, "height": 900}
PHONE: ViewportSize = {"width": 390, "height": 844}
TIMEOUT_MS = 15_000


def unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the browser test must run)", pytrace=False)
    pytest.skip(reason)


def chromium_path(playwrights_own: str) -> str | None:
    """The Chromium to launch: CHROMIUM_PATH's, the one on PATH, or Playwright's download."""
    for candidate in (str(CHROMIUM), shutil.which("chromium"), playwrights_own):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        unavailable(f"Playwright for Python is not installed ({exc}): pip install playwright")
        raise  # unreachable: unavailable fails or skips
    with sync_playwright() as playwright:
        executable = chromium_path(playwright.chromium.executable_path)
        if executable is None:
            unavailable(
                f"No Chromium at {CHROMIUM}, on PATH or Playwright's: scripts/provision-browser"
                " (make test runs it)"
            )
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Tab:
    """A page that records every script error and CSP violation (there must be none)."""

    page: Page
    problems: list[str] = field(default_factory=list)
    shots: list[Path] = field(default_factory=list)

    def fits_the_screen(self) -> bool:
        widths = self.page.evaluate(
            "() => [document.documentElement.scrollWidth, document.body.scrollWidth,"
            " window.innerWidth]"
        )
        return bool(max(widths[0], widths[1]) <= widths[2])

    def screenshots(self, name: str) -> None:
        """`name`-desktop.png and `name`-phone.png of the page as it is; on the phone width
        the page must not scroll sideways."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for width, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
            self.page.set_viewport_size(viewport)
            path = SCREENSHOTS / f"{name}-{width}.png"
            self.page.screenshot(path=str(path), full_page=True)
            assert path.stat().st_size > 0
            self.shots.append(path)
            if width == "phone":
                assert self.fits_the_screen(), f"{name}: horizontal scroll on a phone"
        self.page.set_viewport_size(DESKTOP)


@contextlib.contextmanager
def open_tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context(viewport=DESKTOP)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    tab = Tab(page)
    page.on("pageerror", lambda error: tab.problems.append(f"page error: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        # A 4xx page is logged by Chromium as "Failed to load resource": expected here.
        if message.type == "error" and "Failed to load resource" not in message.text:
            tab.problems.append(f"console: {message.text}")

    page.on("console", on_console)
    try:
        yield tab
    finally:
        context.close()
    assert tab.problems == [], tab.problems  # no CSP violation, no script error
