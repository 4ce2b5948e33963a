"""Issue 21, finding 15: what a new user met running the service as the README says.

- `kill -9` of `serve` left the embedded PostgreSQL running, and the next `make run` joined it
  and left it running on exit: the next command now adopts it (and stops it when it ends), and
  `ciris-billing db stop` stops it;
- SIGTERM of `serve` exited 143 (systemd marks that failed): now 0.

`serve` runs as the real process it is (as tests/operations/test_cli.py does).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ciris_billing.embedded import stop
from tests.operations.test_cli import _postgres_serving
from tests.support.cli import cli
from tests.support.servers import free_port

CLI = [sys.executable, "-m", "ciris_billing.cli"]


@contextlib.contextmanager
def serving(env: dict[str, str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`ciris-billing serve` until healthy; killed (its group) if the test left it running."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [*CLI, "serve", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def _terminate(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=60)


def test_finding15_sigterm_of_serve_exits_0(fresh_database: str, tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": fresh_database}

    with serving(env, tmp_path, tmp_path / "serve.log") as process:
        code = _terminate(process)

    assert code == 0, (tmp_path / "serve.log").read_text()


@pytest.mark.slow
def test_finding15_serve_adopts_the_embedded_postgres_a_killed_serve_left(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    data_dir = tmp_path / ".data" / "postgres"
    try:
        with serving(env, tmp_path, tmp_path / "first.log") as first:
            os.kill(first.pid, signal.SIGKILL)  # the serve process alone, as `kill -9 PID`
            first.wait(timeout=30)
        assert _postgres_serving(data_dir), "the killed serve left its PostgreSQL running"

        with serving(env, tmp_path, tmp_path / "second.log") as second:
            assert _terminate(second) == 0, "SIGTERM: a clean exit, also with embedded PG"

        printed = (tmp_path / "second.log").read_text()
        assert "adopted" in printed, printed
        assert not _postgres_serving(data_dir), "the adopting serve stopped it on exit"
    finally:
        stop(data_dir)  # whatever happened, nothing is left running


@pytest.mark.slow
def test_finding15_db_stop_stops_a_left_running_embedded_postgres(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["EMBEDDED_POSTGRES_DIR"] = str(tmp_path / ".data" / "postgres")
    data_dir = tmp_path / ".data" / "postgres"
    try:
        with serving(env, tmp_path, tmp_path / "serve.log") as server:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        assert _postgres_serving(data_dir)

        stopped = cli(env, "db", "stop")

        assert stopped.returncode == 0, stopped.stderr
        assert "Stopped the embedded PostgreSQL" in stopped.stdout
        assert not _postgres_serving(data_dir)
        again = cli(env, "db", "stop")
        assert again.returncode == 0
        assert "No embedded PostgreSQL running" in again.stdout
    finally:
        stop(data_dir)
