"""Database faults while charges run: connections killed, the database gone and back.

The real service (`ciris-billing serve`, two workers) on this session's PostgreSQL database.
Only that database's connections are ever killed (other tests and people share the server),
and the server itself is never restarted: a restart is played by a TCP proxy between the
service and PostgreSQL that cuts every connection and refuses new ones, then comes back.
With SOAK=1, a real restart (pg_ctl stop, start) of a private throwaway PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from ciris_billing.cli import migrate_database
from tests.support.cli import cli, create_key
from tests.support.faults import (
    Attempt,
    LedgerCheck,
    charge_attempts,
    check_charges,
    create_accounts,
    dump,
    fire_charges,
    proxied_database,
    settle,
    users,
)
from tests.support.postgres import truncate
from tests.support.servers import free_port, running_service, service_env

pytestmark = pytest.mark.slow  # real service processes, connections killed

UNAVAILABLE = {"error": "database_unavailable", "detail": "The database is unreachable; retry"}


def _client(base: str, key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base,
        headers={"X-API-Key": key},
        limits=httpx.Limits(max_connections=64, keepalive_expiry=1),  # < uvicorn 5 s
        timeout=30,
    )


def _assert_answers_are_clean(attempts: list[Attempt]) -> None:
    """Only 201, 402 or a clear 503: never a 500, never a broken connection."""
    for attempt in attempts:
        assert attempt.status in (201, 402, 503), dump(attempts)
        if attempt.status == 503:
            assert attempt.answer == UNAVAILABLE, attempt.answer


async def _recovered(http: httpx.AsyncClient, prefix: str, count: int = 24) -> None:
    """New charges succeed by themselves once the fault is over.

    Each worker may answer one more 503 when it first finds a pooled connection that died
    while idle (the pool is then renewed: no pre-ping), and nothing after that.
    """
    person = {"oauth_provider": "oauth:google", "external_id": f"{prefix}-after@example.com"}
    statuses: list[int] = []
    for _ in range(count):
        response = await http.post("/v1/billing/charges", json=person)
        if response.status_code == 503:
            assert response.json() == UNAVAILABLE
        statuses.append(response.status_code)
    answered = [status for status in statuses if status != 503]
    # 3 free uses, then 402: no 503 charged anything, and every other answer is right.
    assert answered == [201] * 3 + [402] * (len(answered) - 3), statuses
    assert statuses.count(503) <= 4, statuses
    assert 503 not in statuses[count // 2 :], statuses


async def test_connections_killed_while_charging(
    postgres_url: str, postgres_admin_url: str, tmp_path: Path
) -> None:
    await truncate(postgres_url)
    database = urlsplit(postgres_url).path.lstrip("/")
    env = service_env(postgres_url, RATE_LIMIT_ACCOUNT_PER_MINUTE="60000")
    key = create_key(env, "admin")  # paid initial balances: admin
    prefix = "pgkill"
    people = users(prefix, 30)
    attempts = charge_attempts(prefix, people, per_user=12)  # 360 charges; 11 uses each
    killed = 0
    with running_service(env, tmp_path / "server.log", workers=2) as base:
        async with _client(base, key) as http:
            await create_accounts(http, people)
            charging = asyncio.Event()

            async def chaos() -> None:
                nonlocal killed
                admin = await asyncpg.connect(postgres_admin_url, timeout=5)
                try:
                    while not charging.is_set():
                        killed += await admin.fetchval(
                            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                            "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                            database,
                        )
                        await asyncio.sleep(0.03)
                finally:
                    await admin.close()

            health: list[int] = []

            async def probe_health() -> None:
                while not charging.is_set():
                    health.append((await http.get("/health")).status_code)
                    await asyncio.sleep(0.02)

            side_tasks = [asyncio.create_task(chaos()), asyncio.create_task(probe_health())]
            try:
                await fire_charges(http, attempts, concurrency=32)
            finally:
                charging.set()
                await asyncio.gather(*side_tasks)
            _assert_answers_are_clean(attempts)
            assert set(health) <= {200, 503}, health
            await _recovered(http, prefix)
            await settle(http, attempts)
    checked = await check_charges(postgres_url, prefix, attempts, per_user=12)
    print(f"pg_terminate_backend killed {killed} connections; {checked.summary()}")
    assert killed > 0
    assert checked.first_statuses.get("503", 0) > 0, "the chaos hit no request"
    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr


async def _outage_while_charging(
    service_url: str,
    direct_url: str,
    log_path: Path,
    prefix: str,
    down: Callable[[], None],
    up: Callable[[], None],
) -> LedgerCheck:
    """Charges run; the database goes down (`down`) for 1.5 s and comes back (`up`).

    While it is down, requests fail fast with 503 database_unavailable (and /health says so);
    when it is back the service recovers by itself; the ledger matches the answers exactly.
    """
    env = service_env(service_url, RATE_LIMIT_ACCOUNT_PER_MINUTE="60000")
    key = create_key(env, "admin")  # paid initial balances: admin
    people = users(prefix, 30)
    attempts = charge_attempts(prefix, people, per_user=12)  # 360 charges; 11 uses each
    with running_service(env, log_path, workers=2) as base:
        async with _client(base, key) as http:
            await create_accounts(http, people)
            under_way = asyncio.Event()

            async def outage() -> None:
                await under_way.wait()
                await asyncio.to_thread(down)
                await asyncio.sleep(1.5)
                # While down: fast, clear answers.
                started = time.monotonic()
                response = await http.post(
                    "/v1/billing/charges", json={**people[0], "description": "while down"}
                )
                took = time.monotonic() - started
                assert response.status_code == 503, response.text
                assert response.json() == UNAVAILABLE
                assert response.headers["Retry-After"] == "1"
                assert took < 2, f"a request took {took:.1f} s to fail while down"
                health = await http.get("/health")
                assert health.status_code == 503
                assert health.json()["database"] == "unreachable"
                await asyncio.to_thread(up)
                # Back: /health says so again by itself.
                assert (await http.get("/health")).json()["database"] == "ok"

            def outage_after_60(done: int) -> None:
                if done == 60:
                    under_way.set()

            outage_task = asyncio.create_task(outage())
            await fire_charges(http, attempts, concurrency=16, on_answer=outage_after_60)
            await outage_task
            _assert_answers_are_clean(attempts)
            await _recovered(http, prefix)
            await settle(http, attempts)
    checked = await check_charges(direct_url, prefix, attempts, per_user=12)
    assert checked.first_statuses.get("503", 0) > 0, "the outage hit no request"
    audited = cli(service_env(direct_url), "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    return checked


async def test_database_down_then_back(postgres_url: str, tmp_path: Path) -> None:
    """A restart, seen from the service (the shared server itself is never restarted): a TCP
    proxy between the service and PostgreSQL cuts every connection and refuses new ones."""
    await truncate(postgres_url)
    with proxied_database(postgres_url) as (proxy, via_proxy):
        checked = await _outage_while_charging(
            via_proxy, postgres_url, tmp_path / "server.log", "pgdown", proxy.down, proxy.up
        )
    print(f"database down for 1.5 s: {checked.summary()}")


# --- SOAK=1: a real PostgreSQL restart, on a private throwaway server -----------------------


@contextlib.contextmanager
def _private_postgresql() -> Iterator[tuple[str, Callable[..., None]]]:
    """initdb + pg_ctl start on a free port (as the `postgres` user when we are root); yields
    the URL of its `postgres` database and `pg_ctl(*args)`; stopped and removed at the end."""
    bindir = subprocess.run(
        ["pg_config", "--bindir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    home = Path(tempfile.mkdtemp(prefix="ciris-faults-pg-"))
    home.chmod(0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(home, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = home / "data", free_port()

    def run(*command: str) -> None:
        subprocess.run([*as_user, *command], check=True, capture_output=True, timeout=120)

    def pg_ctl(*args: str) -> None:
        options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1"
        run(f"{bindir}/pg_ctl", "-D", str(data), "-l", str(home / "log"), "-o", options, *args)

    try:
        run(f"{bindir}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-N")
        pg_ctl("-w", "start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", pg_ctl
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            pg_ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.soak
async def test_postgresql_restarted_while_charging(tmp_path: Path) -> None:
    """pg_ctl stop (fast), 1.5 s down, pg_ctl start, while charges run: the same promises."""
    with _private_postgresql() as (url, pg_ctl):
        await asyncio.to_thread(migrate_database, url)
        checked = await _outage_while_charging(
            url,
            url,
            tmp_path / "server.log",
            "pgrestart",
            lambda: pg_ctl("-m", "fast", "-w", "stop"),
            lambda: pg_ctl("-w", "start"),
        )
    print(f"PostgreSQL restarted: {checked.summary()}")
