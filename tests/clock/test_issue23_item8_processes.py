"""Issue 23 item 8, across processes: the service runs several worker processes and a separate
`worker`; an advance answered by one of them is seen by every one (each re-reads the offset
from the database twice a second in sandbox mode, and the advance answers after 1.5 s).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import select

from ciris_billing.db import create_engine, reservations
from tests.support.api import identity
from tests.support.cli import create_key
from tests.support.servers import CLI, running_service, service_env

CLOCK = "/v1/billing/test_clock"
DAY = 86_400
# Fresh connections, each spread by the kernel across the two workers' SO_REUSEPORT sockets:
# the chance that all of them reach the one worker that answered the advance is 2^-23.
HITS = 24


def who() -> dict[str, str]:
    return identity(f"procs-{uuid.uuid4().hex[:10]}@example.com")


def ahead(value: str) -> timedelta:
    return datetime.fromisoformat(value) - datetime.now(UTC)


def test_two_workers_both_see_an_advance(fresh_database: str, tmp_path: Path) -> None:
    env = service_env(fresh_database, RATE_LIMIT_ACCOUNT_PER_MINUTE="60000")
    admin = {"X-API-Key": create_key(env, "admin")}
    with running_service(env, tmp_path / "serve.log", workers=2) as base:
        moved = httpx.post(f"{base}{CLOCK}/advance", json={"seconds": 5 * DAY}, headers=admin)
        assert moved.status_code == 200, moved.text
        for _ in range(HITS):
            with httpx.Client(base_url=base, headers=admin, timeout=10) as client:
                shown = client.get(CLOCK)
                assert shown.json()["offset_seconds"] == 5 * DAY, shown.text
                made = client.post("/v1/billing/accounts", json=who())
                assert made.status_code == 201, made.text
                assert ahead(made.json()["created_at"]) > timedelta(days=5, seconds=-60)


async def _status(database_url: str, reservation_id: str) -> str:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            status = await conn.scalar(
                select(reservations.c.status).where(reservations.c.id == reservation_id)
            )
            return str(status)
    finally:
        await engine.dispose()


def test_a_separate_worker_expires_a_hold_on_the_moved_clock(
    fresh_database: str, tmp_path: Path
) -> None:
    # The service runs no jobs: only the `worker` process can expire the hold.
    env = service_env(fresh_database, JOBS_ENABLED="false", JOBS_POLL_SECONDS="1")
    admin = {"X-API-Key": create_key(env, "admin")}
    log_path = tmp_path / "worker.log"
    with running_service(env, tmp_path / "serve.log", workers=2) as base:
        with log_path.open("w") as log:
            worker = subprocess.Popen(
                [*CLI, "worker"],
                env={**env, "JOBS_ENABLED": "true", "DB_POOL_SIZE": "3"},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            held = httpx.post(
                f"{base}/v1/billing/reservations",
                json={**who(), "uses": 1, "ttl_seconds": 3600},
                headers=admin,
            )
            assert held.status_code == 201, held.text
            hold_id = held.json()["reservation_id"]
            time.sleep(3)  # a few of the worker's runs: the hold is not due on real time
            assert asyncio.run(_status(fresh_database, hold_id)) == "held", log_path.read_text()

            moved = httpx.post(f"{base}{CLOCK}/advance", json={"seconds": 3601}, headers=admin)
            assert moved.status_code == 200, moved.text
            deadline = time.monotonic() + 30
            while asyncio.run(_status(fresh_database, hold_id)) != "expired":
                assert worker.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.3)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
