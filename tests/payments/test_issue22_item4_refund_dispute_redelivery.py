"""Issue 22 item 4, the rest of "the sandbox redelivers its webhooks as Stripe does": a refund
or a dispute made at the provider (its dashboard, the bank) is announced by a webhook kept
until the service's inbox takes it, like a payment's. Its first delivery is lost here for real:
it goes to the service's webhook route on a port where nothing listens at that moment. The
jobs send it again (in `serve`, or in a separate `ciris-billing worker` process): applied once,
`audit` clean.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
from sqlalchemy import select, update

from ciris_billing.db import credits, sandbox_webhook_events
from ciris_billing.jobs import Recovery
from ciris_billing.payments.providers.sandbox import SandboxProvider
from tests.support.api import Api, identity
from tests.support.flows import check, paid_purchase
from tests.support.servers import CLI, free_port, service_env

USER = identity("lost-refund@example.com")


def unreachable_inbox(api: Api) -> SandboxProvider:
    """The sandbox as it is when the service's webhook route cannot be reached: its deliveries
    go to 127.0.0.1 on a port where nothing listens (a real connection refused)."""
    url = f"http://127.0.0.1:{free_port()}/v1/billing/webhooks/sandbox"

    async def post(payload: bytes, signature: str) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            answer = await http.post(url, content=payload, headers={"Stripe-Signature": signature})
            answer.raise_for_status()

    return SandboxProvider(api.engine, api.state.secrets.sandbox_webhook_secret, post)


async def events_of(api: Api, payment_id: str, prefix: str) -> list[tuple[str, int, bool]]:
    async with api.engine.connect() as conn:
        rows = await conn.execute(
            select(sandbox_webhook_events)
            .where(
                sandbox_webhook_events.c.payment_id == payment_id,
                sandbox_webhook_events.c.type.startswith(prefix),
            )
            .order_by(sandbox_webhook_events.c.created_at)
        )
        return [(r.type, int(r.attempts), r.delivered_at is not None) for r in rows]


async def due_now(api: Api, payment_id: str) -> None:
    """Its backoff (5 s after the lost attempt) has passed."""
    async with api.engine.begin() as conn:
        await conn.execute(
            update(sandbox_webhook_events)
            .where(sandbox_webhook_events.c.payment_id == payment_id)
            .values(next_attempt_at=sandbox_webhook_events.c.created_at)
        )


async def kinds(api: Api, prefix: str) -> list[str]:
    async with api.engine.connect() as conn:
        return sorted(
            r.kind for r in await conn.execute(select(credits.c.kind)) if r.kind.startswith(prefix)
        )


async def test_a_dashboard_refund_whose_webhook_was_lost_is_applied_after_redelivery(
    api: Api,
) -> None:
    bought = await paid_purchase(api, USER)
    payment_id = bought["payment_id"]
    await unreachable_inbox(api).refund_payment(payment_id, 250)  # half, from the dashboard
    assert (await check(api, USER))["credits_remaining"] == 20, "its webhook never arrived"
    assert await events_of(api, payment_id, "charge.") == [("charge.refunded", 1, False)]
    await due_now(api, payment_id)
    recovery = Recovery(api.settings, api.engine, api.state.provider)
    await recovery.run_once()
    assert await events_of(api, payment_id, "charge.") == [("charge.refunded", 2, True)]
    assert (await check(api, USER))["credits_remaining"] == 10
    await due_now(api, payment_id)
    await recovery.run_once()  # taken: never sent again, never applied twice
    assert await events_of(api, payment_id, "charge.") == [("charge.refunded", 2, True)]
    assert (await check(api, USER))["credits_remaining"] == 10
    assert await kinds(api, "refund") == ["refund"]
    assert (await api.audit()).clean


async def test_a_dispute_whose_webhooks_were_lost_is_applied_after_redelivery(api: Api) -> None:
    bought = await paid_purchase(api, USER)
    payment_id = bought["payment_id"]
    lost = unreachable_inbox(api)
    await lost.dispute(payment_id, "needs_response")
    assert (await check(api, USER))["credits_remaining"] == 20, "its webhook never arrived"
    await due_now(api, payment_id)
    recovery = Recovery(api.settings, api.engine, api.state.provider)
    await recovery.run_once()
    assert (await check(api, USER))["credits_remaining"] == 0, "held once redelivered"
    await lost.dispute(payment_id, "won")
    assert (await check(api, USER))["credits_remaining"] == 0, "its close never arrived"
    await due_now(api, payment_id)
    await recovery.run_once()
    await recovery.run_once()
    assert await events_of(api, payment_id, "charge.dispute") == [
        ("charge.dispute.created", 2, True),
        ("charge.dispute.closed", 2, True),
    ]
    assert (await check(api, USER))["credits_remaining"] == 20, "released once"
    assert await kinds(api, "dispute") == ["dispute_hold", "dispute_won"]
    assert (await api.audit()).clean


async def test_a_separate_worker_process_redelivers_a_lost_refund_webhook(
    api: Api, tmp_path: Path
) -> None:
    bought = await paid_purchase(api, USER)
    payment_id = bought["payment_id"]
    await unreachable_inbox(api).refund_payment(payment_id, None)  # all of it
    await due_now(api, payment_id)
    assert (await check(api, USER))["credits_remaining"] == 20
    log_path = tmp_path / "worker.log"
    env = service_env(api.database_url, JOBS_POLL_SECONDS="1", DB_POOL_SIZE="3")
    with log_path.open("w") as log:
        worker = subprocess.Popen(
            [*CLI, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 60
        while (await check(api, USER))["credits_remaining"] != 0:
            assert worker.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            await asyncio.sleep(0.5)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    assert await events_of(api, payment_id, "charge.") == [("charge.refunded", 2, True)]
    assert await kinds(api, "refund") == ["refund"]
    assert (await api.audit()).clean
