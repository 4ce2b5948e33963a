"""A worker that is slow to start is not taken for a hung one (workers.py STARTUP_GRACE_SECONDS).

A spawned worker answers the supervisor's health pings only after it has imported the service
(2-5 s here, more on a loaded machine). Pinged before, it looked hung, was killed and replaced,
and the replacement again: in CI a worker killed by a fault test did not serve again within
60 s. Played here with a worker whose import takes 1.5 s and a health-check timeout of 0.3 s:
it must start serving, once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SUPERVISED = """
import sys, time
if __name__ != "__main__":  # the worker re-imports this file (spawn): a slow import
    time.sleep(1.5)
from uvicorn.config import Config
from ciris_billing.workers import Supervisor, listening_sockets
if __name__ == "__main__":
    config = Config("tiny_app:app", host="127.0.0.1", port=0, timeout_worker_healthcheck=0.3)
    Supervisor(config, listening_sockets("127.0.0.1", 0, 1)).run()
"""
TINY_APP = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
"""


def test_a_slow_starting_worker_is_not_killed_as_hung(tmp_path: Path) -> None:
    (tmp_path / "supervised.py").write_text(SUPERVISED)
    (tmp_path / "tiny_app.py").write_text(TINY_APP)
    log = tmp_path / "server.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, str(tmp_path / "supervised.py")],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while "Application startup complete" not in log.read_text():
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"no start-up in 20 s:\n{log.read_text()}"
            time.sleep(0.2)
        time.sleep(1)  # a few more health checks: the worker stays
        text = log.read_text()
        assert "died" not in text, text
        assert text.count("Started server process") == 1, text
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # ours: its own session, by pid
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
