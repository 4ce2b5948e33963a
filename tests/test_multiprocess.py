"""The acceptance test: several server processes on one PostgreSQL, real HTTP over loopback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

CLI = [sys.executable, "-m", "ciris_billing.cli"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env(database_url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "INFO"}


@pytest.fixture
def server(postgres_url: str, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """`ciris-billing serve --workers 2` on 127.0.0.1; stopped (by its pid) when the test ends."""
    from tests.conftest import _truncate

    asyncio.run(_truncate(postgres_url))
    env = _env(postgres_url)
    created = subprocess.run(
        [*CLI, "keys", "create", "--name", "mp-test", "--scopes", "write"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key = created.stdout.strip().splitlines()[-1]
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [*CLI, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp_path / "server.log").read_text())
            time.sleep(0.2)
        yield base, key, tmp_path / "server.log"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _audit(database_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "audit"], env=_env(database_url), capture_output=True, text=True, timeout=60
    )


async def test_two_workers_100_charges_23_uses(
    server: tuple[str, str, Path], postgres_url: str
) -> None:
    base, key, log_path = server
    user = {"oauth_provider": "oauth:google", "external_id": "mp@example.com"}
    limits = httpx.Limits(max_connections=100)
    async with httpx.AsyncClient(
        base_url=base, headers={"X-API-Key": key}, limits=limits, timeout=60
    ) as http:
        created = await http.post(
            "/v1/billing/accounts", json={**user, "initial_balance_minor": 20}
        )
        assert created.status_code == 201
        responses = await asyncio.gather(
            *(http.post("/v1/billing/charges", json=user) for _ in range(100))
        )
        statuses = [r.status_code for r in responses]
        assert statuses.count(201) == 23, statuses
        assert statuses.count(402) == 77, statuses

        new_user = {"oauth_provider": "oauth:google", "external_id": "mp-new@example.com"}
        checks = await asyncio.gather(
            *(http.post("/v1/billing/credits/check", json=new_user) for _ in range(50))
        )
        assert {r.status_code for r in checks} == {200}
        got = await http.get("/v1/billing/transactions", params=new_user)
        assert got.status_code == 200
        assert got.json()["total"] == 1, "one account, one free grant"

    worker_pids = set(re.findall(r"Started server process \[(\d+)\]", log_path.read_text()))
    assert len(worker_pids) >= 2, log_path.read_text()
    audited = _audit(postgres_url)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "Audited 2 accounts: clean." in audited.stdout
