"""Issue 22 item 5: `make test` on a fresh machine skipped the browser tests (no Chromium: errors
under CI=true, silent skips without). `make test` now provisions its browser itself
(scripts/provision-browser): found, else Debian's package when root, else Playwright's own
download, else one line saying how.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.browser import chromium

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "provision-browser"


def provision(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/bash", str(SCRIPT)],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


def test_make_test_runs_the_browser_provisioning_first() -> None:
    dry = subprocess.run(
        ["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    lines = dry.stdout.splitlines()
    provisioning = next(i for i, line in enumerate(lines) if "scripts/provision-browser" in line)
    pytest_run = next(i for i, line in enumerate(lines) if "bin/pytest" in line)
    assert provisioning < pytest_run


@pytest.mark.slow
def test_make_test_provisions_a_chromium_the_browser_tests_launch() -> None:
    """On this machine: whatever it had, afterwards a Chromium is there and launches (the
    first run here installed Debian's package, as root)."""
    done = provision()
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("browser: /"), line
    with chromium() as browser:
        page = browser.new_page()
        page.set_content("<p id=ok>ok</p>")
        assert page.inner_text("#ok") == "ok"


def test_without_a_browser_or_a_way_to_install_one_it_says_so_in_one_line(tmp_path: Path) -> None:
    # No Chromium anywhere it looks (a PATH of only the tools the script needs), apt-get
    # failing, a Python without Playwright.
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "id", "dirname", "timeout", "false"):
        (tools / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    no_playwright = tmp_path / "python"
    no_playwright.write_text("#!/bin/sh\nexit 1\n")
    no_playwright.chmod(0o755)
    done = provision(
        CHROMIUM_PATH=str(tmp_path / "none"),
        PATH=str(tools),
        APT_GET="false",
        PYTHON=str(no_playwright),
    )
    assert done.returncode == 0  # the tests still run; they say why they skip (fail under CI)
    said = done.stdout.strip().splitlines()[-1]  # the one line of what to do
    assert said.startswith("browser: no Chromium"), said
    assert "apt-get install -y chromium" in said
