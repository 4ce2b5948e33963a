"""The operator's commands: first-start key, keys create/list/revoke, audit, migrate.

Commands run in process (click's runner, tests/support/cli.py); `serve` runs as the real
process it is: the first start's key, the refusal of unsafe configurations, and the embedded
PostgreSQL when DATABASE_URL is unset."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from ciris_billing.db import accounts, create_engine
from tests.support.cli import CliResult, cli
from tests.support.servers import free_port as _free_port

CLI = [sys.executable, "-m", "ciris_billing.cli"]


def run(database_url: str, *args: str) -> CliResult:
    return cli({**os.environ, "DATABASE_URL": database_url}, *args)


@pytest.mark.slow
def test_first_start_prints_an_admin_key_once(fresh_database: str, tmp_path: Path) -> None:
    database_url = fresh_database
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": database_url}
    out = (tmp_path / "out.log").open("w")
    process = subprocess.Popen(
        [*CLI, "serve", "--port", str(port)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.2)
        printed = (tmp_path / "out.log").read_text()
        # Not a terminal: the key is in a 0600 file whose path is printed (finding 9).
        key_file = Path(printed.split("it is in ", 1)[1].split()[0])
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert key.startswith("cbk_")
        assert key not in printed
        assert "ciris-billing keys create" in printed
        check = httpx.post(
            f"http://127.0.0.1:{port}/v1/billing/credits/check",
            json={"oauth_provider": "oauth:google", "external_id": "cli@example.com"},
            headers={"X-API-Key": key},
        )
        assert check.status_code == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        out.close()
    second = run(database_url, "keys", "list")
    assert "admin (first start)" in second.stdout
    assert key not in second.stdout


def test_keys_create_list_revoke(fresh_database: str) -> None:
    database_url = fresh_database
    assert run(database_url, "migrate").returncode == 0
    created = run(database_url, "keys", "create", "--name", "agent", "--scopes", "read,write")
    assert created.returncode == 0
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("cbk_")
    listed = run(database_url, "keys", "list").stdout
    assert "agent" in listed
    assert "read,write" in listed
    assert key not in listed
    key_id = listed.split()[0]
    assert run(database_url, "keys", "revoke", key_id).returncode == 0
    assert "revoked" in run(database_url, "keys", "list").stdout
    assert run(database_url, "keys", "revoke", key_id).returncode != 0
    bad = run(database_url, "keys", "create", "--name", "x", "--scopes", "root")
    assert bad.returncode != 0


def test_audit_finds_a_tampered_counter(fresh_database: str) -> None:
    database_url = fresh_database
    assert run(database_url, "migrate").returncode == 0
    assert run(database_url, "audit").stdout.strip() == "Audited 0 accounts: clean."

    async def setup_and_tamper() -> None:
        from ciris_billing.accounts import service
        from ciris_billing.pricing import Pricing

        engine = create_engine(database_url)
        pricing = Pricing(3, 20, 500, "USD")
        async with engine.begin() as conn:
            await service.ensure_account(conn, service.Identity("oauth:google", "a@b.c"), pricing)
            await service.ensure_account(conn, service.Identity("oauth:google", "d@e.f"), pricing)
        async with engine.begin() as conn:
            await conn.execute(
                update(accounts)
                .where(accounts.c.external_id == "a@b.c")
                .values(paid_uses_remaining=7)
            )
        await engine.dispose()

    asyncio.run(setup_and_tamper())
    audited = run(database_url, "audit")
    assert audited.returncode == 1
    assert "MISMATCH" in audited.stdout
    assert "a@b.c" in audited.stdout
    assert "d@e.f" not in audited.stdout


@pytest.mark.slow
def test_unsafe_payment_configurations_refuse_to_start(fresh_database: str) -> None:
    database_url = fresh_database
    cases = [
        ({"PAYMENT_PROVIDER": "sandbox", "STRIPE_API_KEY": "sk_live_abc123"}, "Live Stripe keys"),
        (
            {"PAYMENT_PROVIDER": "stripe", "STRIPE_API_KEY": "sk_test_abc123"},
            "STRIPE_WEBHOOK_SECRET",
        ),
        ({"PAYMENT_PROVIDER": "stripe"}, "needs STRIPE_API_KEY"),
    ]
    for extra, message in cases:
        env = {**os.environ, "DATABASE_URL": database_url, **extra}
        refused = subprocess.run(
            [*CLI, "serve", "--port", str(_free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0
        assert message in refused.stderr
        assert "sk_live_abc123" not in refused.stderr + refused.stdout


def _postgres_serving(data_dir: Path) -> bool:
    """Whether a postgres process serves `data_dir` (its postmaster.pid names a live process)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


@pytest.mark.slow
def test_serve_without_database_url_runs_embedded_postgres(tmp_path: Path) -> None:
    """No DATABASE_URL: `serve` starts an embedded PostgreSQL in .data/postgres under its
    working directory, says where, serves on it, stops it on SIGTERM, and finds the data kept
    on the next start (the first key is not made twice)."""
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    data_dir = tmp_path / ".data" / "postgres"
    printed: list[str] = []
    for run_number in (1, 2):
        port = _free_port()
        log = tmp_path / f"serve-{run_number}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [*CLI, "serve", "--port", str(port)],
                cwd=tmp_path,  # no .env here: DATABASE_URL stays unset
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                deadline = time.monotonic() + 90
                while True:
                    try:
                        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                        if health.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert process.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.2)
                assert health.json()["database"] == "ok"
                assert _postgres_serving(data_dir)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)
        printed.append(log.read_text())
        assert not _postgres_serving(data_dir), "stopped with the service"
    first, second = printed
    assert f"Embedded PostgreSQL (started): data in {data_dir.resolve()}" in first
    assert "DATABASE_URL=postgresql://postgres@127.0.0.1:" in first
    assert "Created the first API key" in first
    assert "Created the first API key" not in second, "the data (and the first key) were kept"
