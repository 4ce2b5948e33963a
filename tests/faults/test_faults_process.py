"""Process faults: a worker of the real service killed with SIGKILL in the middle of charges,
and while it handles a webhook. Nothing half-written; what was lost is recovered exactly once.

Only processes these tests started are killed, by pid: the worker processes of the
`running_service` this test launched (its uvicorn parent is checked to be our child).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from ciris_billing.db import create_engine, credits, webhook_events
from tests.support.cli import cli, create_key
from tests.support.faults import (
    ServiceProcesses,
    charge_attempts,
    check_charges,
    create_accounts,
    dump,
    fire_charges,
    http_fault_proxy,
    settle,
    signed_event,
    users,
)
from tests.support.localstripe import run_localstripe
from tests.support.postgres import truncate
from tests.support.servers import running_service, service_env
from tests.support.stripe_stack import WEBHOOK_SECRET, Stack, stripe_env

pytestmark = pytest.mark.slow  # real service processes, workers killed


async def _open_transactions(database_url: str) -> int:
    """Other sessions of this database idle inside a transaction (a write left half-done)."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            found = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                )
            )
            return int(found or 0)
    finally:
        await engine.dispose()


async def test_worker_killed_in_the_middle_of_charges(postgres_url: str, tmp_path: Path) -> None:
    await truncate(postgres_url)
    env = service_env(postgres_url, RATE_LIMIT_ACCOUNT_PER_MINUTE="60000")
    key = create_key(env, "admin")  # paid initial balances: admin
    prefix = "sigkill"
    people = users(prefix, 30)
    attempts = charge_attempts(prefix, people, per_user=12)  # 360 charges; 11 uses each
    log_path = tmp_path / "server.log"
    with running_service(env, log_path, workers=2) as base:
        processes = ServiceProcesses.from_log(log_path)
        processes.wait_for_workers(2)
        port = int(base.rsplit(":", 1)[1])
        victim = unread = 0
        async with httpx.AsyncClient(
            base_url=base,
            headers={"X-API-Key": key},
            limits=httpx.Limits(max_connections=64, keepalive_expiry=1),  # < uvicorn 5 s
            timeout=30,
        ) as http:
            await create_accounts(http, people)

            under_way = asyncio.Event()

            def midway(done: int) -> None:
                if done == 60:
                    under_way.set()

            async def freeze_then_kill() -> None:
                # Freeze the busier worker, so that requests pile up in it (some inside a
                # transaction, some committed but not answered, some not read yet), then kill it.
                nonlocal victim, unread
                await under_way.wait()
                victim = processes.busiest_worker(port)
                processes.kill_worker(victim, signal.SIGSTOP)
                frozen_at = time.monotonic()
                while True:  # a few requests caught in it, or at least one after 3 s
                    await asyncio.sleep(0.1)
                    unread = processes.unread_requests(victim, port)
                    waited = time.monotonic() - frozen_at
                    if unread >= 4 or (unread and waited > 3) or waited > 10:
                        break
                processes.kill_worker(victim)

            killer = asyncio.create_task(freeze_then_kill())
            await fire_charges(http, attempts, concurrency=32, on_answer=midway)
            await killer
            for attempt in attempts:
                assert attempt.status in (201, 402, None), dump(attempts)
            lost = [a for a in attempts if a.status is None]

            # uvicorn replaces the dead worker; the service answers all along.
            after = processes.wait_for_workers(2)
            assert victim not in after
            person = {"oauth_provider": "oauth:google", "external_id": f"{prefix}-after@x.com"}
            statuses = [
                (await http.post("/v1/billing/charges", json=person)).status_code for _ in range(8)
            ]
            assert statuses == [201] * 3 + [402] * 5, statuses

            # The dead worker's transactions were rolled back by PostgreSQL, none left open.
            assert await _open_transactions(postgres_url) == 0
            await settle(http, attempts)
    checked = await check_charges(postgres_url, prefix, attempts, per_user=12)
    print(
        f"SIGKILL of worker {victim} holding {unread} unread requests: "
        f"{len(lost)} answers lost (settled: {sorted(a.final_status or 0 for a in lost)}); "
        f"{checked.summary()}"
    )
    assert len(lost) >= unread > 0, "the kill hit no request in flight"
    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr


async def _event_row(database_url: str, event_id: str) -> Any:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return (
                await conn.execute(
                    select(webhook_events).where(webhook_events.c.event_id == event_id)
                )
            ).one_or_none()
    finally:
        await engine.dispose()


async def _credit_rows(database_url: str, payment_id: str) -> int:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            found = await conn.scalar(
                select(func.count())
                .select_from(credits)
                .where(credits.c.external_transaction_id == payment_id)
            )
            return int(found or 0)
    finally:
        await engine.dispose()


async def test_worker_killed_while_handling_a_webhook(postgres_url: str, tmp_path: Path) -> None:
    """payment_intent.succeeded arrives; the worker stores it, asks Stripe (slow: a delaying
    proxy) and is SIGKILLed while it waits. The event is stored, not handled, nothing credited;
    `webhooks replay` credits it once; a redelivery and `reconcile` add nothing."""
    await truncate(postgres_url)
    user = "sigkill-webhook@example.com"
    event_id = f"evt_sigkill_{time.monotonic_ns()}"
    log_path = tmp_path / "server.log"
    with (
        run_localstripe(tmp_path / "localstripe") as stripe_server,
        http_fault_proxy(stripe_server.base_url) as proxy,
    ):
        env = stripe_env(postgres_url, proxy.url)
        key = create_key(env)
        with running_service(env, log_path, workers=2) as base:
            processes = ServiceProcesses.from_log(log_path)
            processes.wait_for_workers(2)
            stack = Stack(base, key, stripe_server, env, log_path)
            bought = stack.purchase(user)
            payment_id = bought["payment_id"]
            assert stripe_server.pay(payment_id)["status"] == "succeeded"

            proxy.set(delay=60)  # Stripe now answers only when released
            payload, headers = signed_event(event_id, payment_id, WEBHOOK_SECRET)
            async with httpx.AsyncClient(timeout=60) as http:
                delivery = asyncio.create_task(
                    http.post(
                        f"{base}/v1/billing/webhooks/stripe", content=payload, headers=headers
                    )
                )
                waiting = await asyncio.to_thread(
                    proxy.wait_for_request, f"/v1/payment_intents/{payment_id}"
                )
                worker = processes.worker_with_port(waiting.client_port)
                assert worker is not None, "no worker holds the connection to Stripe"
                processes.kill_worker(worker)
                with pytest.raises(httpx.TransportError):
                    await delivery
            proxy.release()

            stored = await _event_row(postgres_url, event_id)
            assert stored is not None, "the event was not stored before the worker died"
            assert stored.handled_at is None
            assert await _credit_rows(postgres_url, payment_id) == 0
            assert worker not in processes.wait_for_workers(2)
            assert stack.check(user)["credits_remaining"] == 0  # still serving

            replay = cli(env, "webhooks", "replay")
            assert replay.returncode == 0, replay.stdout + replay.stderr
            assert f"{event_id}: credited" in replay.stdout, replay.stdout
            again = httpx.post(
                f"{base}/v1/billing/webhooks/stripe", content=payload, headers=headers, timeout=30
            )
            assert again.status_code == 200, again.text
            assert again.json()["outcome"] == "duplicate"
            reconciled = cli(env, "reconcile")
            assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
            assert stack.check(user)["credits_remaining"] == 20
            assert stack.wait_for_purchase(payment_id, "succeeded")["credited"] is True
    assert await _credit_rows(postgres_url, payment_id) == 1
    audited = cli(service_env(postgres_url), "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
