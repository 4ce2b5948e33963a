"""The background jobs (jobs.py), in-process: what they fix with no operator command, how a
failed webhook event is recorded and retried with backoff, the audit that compares purchases
with the provider's payments, and one run at a time across several job workers."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from sqlalchemy import func, select

from ciris_billing.accounts.service import Identity
from ciris_billing.db import credits, purchases, utcnow, webhook_events
from ciris_billing.errors import BillingError
from ciris_billing.jobs import JobWorker, Recovery, RecoveryReport
from ciris_billing.payments import service as payments
from ciris_billing.payments.providers.base import PaymentIntent
from ciris_billing.payments.providers.sandbox import SandboxProvider
from ciris_billing.unit_of_work import unit_of_work
from ciris_billing.webhooks import inbox
from tests.support.api import Api, identity, make_settings
from tests.support.cli import cli
from tests.support.faults import signed_event
from tests.support.servers import service_env


def _silent_sandbox(api: Api) -> SandboxProvider:
    """The sandbox as the CLI gets it: same payments, but its webhooks go nowhere (a delivery
    lost, as when the worker that would store it is killed)."""
    return SandboxProvider(api.engine, api.state.secrets.sandbox_webhook_secret, None)


async def _credits_for(api: Api, payment_id: str) -> int:
    async with api.engine.connect() as conn:
        found = await conn.scalar(
            select(func.count())
            .select_from(credits)
            .where(credits.c.external_transaction_id == payment_id)
        )
        return int(found or 0)


async def test_audit_reports_paid_but_uncredited_until_the_job_credits_it(api: Api) -> None:
    """Finding 1: a paid purchase whose webhook was lost. `audit` (which asks the provider)
    reports it and exits 1; the reconcile job credits it, once; audit is then clean."""
    bought = await api.post("/v1/billing/purchases", identity("lost-webhook@example.com"))
    assert bought.status_code == 201, bought.text
    payment_id = bought.json()["payment_id"]
    paid = await _silent_sandbox(api).confirm_with_card(
        payment_id, bought.json()["client_secret"], "4242424242424242"
    )
    assert paid.state == "succeeded"
    assert await _credits_for(api, payment_id) == 0
    assert (await api.audit()).clean  # the database alone agrees with itself

    env = service_env(api.database_url, PAYMENT_PROVIDER="sandbox")
    audited = cli(env, "audit")
    assert audited.returncode == 1, audited.stdout + audited.stderr
    assert f"PURCHASE paid_but_uncredited: {bought.json()['purchase_id']}" in audited.stdout

    settings = make_settings(api.database_url, reconcile_after_seconds=0)
    recovery = Recovery(settings, api.engine, api.state.provider)
    report = await recovery.run_once()
    assert report.purchases == {"credited": 1}, report
    again = await recovery.run_once()  # asked again only later (backoff); nothing twice
    assert again.purchases.get("credited", 0) == 0, again
    assert await _credits_for(api, payment_id) == 1
    checked = await api.post("/v1/billing/credits/check", identity("lost-webhook@example.com"))
    assert checked.json()["credits_remaining"] == 20, checked.text

    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert (await api.audit()).clean


async def test_a_failed_webhook_event_is_recorded_and_retried_with_backoff(api: Api) -> None:
    """An event whose handling fails keeps its attempt, its error and a time to retry; the job
    retries it when that time comes, and credits the payment once."""
    provider = _silent_sandbox(api)
    person = Identity(oauth_provider="oauth:google", external_id="early-event@example.com")
    created = await api.post("/v1/billing/accounts", {**identity(person.external_id)})
    assert created.status_code in (200, 201), created.text
    account_id = created.json()["account_id"]
    purchase_id = "pur_early_event"
    intent = PaymentIntent(500, "USD", purchase_id, account_id, f"purchase-{purchase_id}")
    payment = await provider.create_payment_intent(intent)
    assert payment.client_secret is not None
    await provider.confirm_with_card(payment.payment_id, payment.client_secret, "4242424242424242")
    # The event arrives before the purchase row is recorded (its request is still running).
    secret = api.state.secrets.sandbox_webhook_secret
    payload, headers = signed_event("evt_early", payment.payment_id, secret)
    before = utcnow()
    try:
        async with unit_of_work(api.engine) as work:
            await inbox.receive(
                work, provider, payload, headers["Stripe-Signature"], retry_base_seconds=1
            )
        raise AssertionError("handling an event for an unrecorded purchase succeeded")
    except BillingError as exc:
        error = exc.code
    async with api.engine.connect() as conn:
        row = (
            await conn.execute(
                select(webhook_events).where(webhook_events.c.event_id == "evt_early")
            )
        ).one()
    assert row.handled_at is None
    assert (row.attempts, row.last_error) == (1, error)
    assert row.next_attempt_at is not None
    # The first retry after the base delay (JOBS_POLL_SECONDS), doubling with each attempt.
    assert before + timedelta(seconds=1) <= row.next_attempt_at <= utcnow() + timedelta(seconds=1)

    async with api.engine.begin() as conn:
        await payments.record_purchase(
            conn,
            purchase_id=purchase_id,
            account_id=account_id,
            provider=provider.name,
            payment=payment,
            offer=payments.Offer(500, "USD", 20),
            customer_email=None,
        )
    settings = make_settings(api.database_url, jobs_poll_seconds=1, reconcile_after_seconds=3600)
    recovery = Recovery(settings, api.engine, provider)
    report = RecoveryReport()
    deadline = time.monotonic() + 10
    while not report.events and time.monotonic() < deadline:
        await asyncio.sleep(0.3)  # not before its retry time
        report = await recovery.run_once()
    assert report.events == {"credited": 1}, report
    async with api.engine.connect() as conn:
        row = (
            await conn.execute(
                select(webhook_events).where(webhook_events.c.event_id == "evt_early")
            )
        ).one()
        credited = (
            await conn.execute(select(purchases).where(purchases.c.id == purchase_id))
        ).one()
    assert (row.attempts, row.last_error, row.outcome) == (2, None, "credited")
    assert credited.credited_at is not None
    assert await _credits_for(api, payment.payment_id) == 1
    assert (await api.audit()).clean


class CountingRecovery(Recovery):
    running = 0
    most = 0
    runs = 0

    async def run_once(self) -> RecoveryReport:
        CountingRecovery.running += 1
        CountingRecovery.runs += 1
        CountingRecovery.most = max(CountingRecovery.most, CountingRecovery.running)
        try:
            await asyncio.sleep(0.3)  # long enough for another worker to try to start one
            return await super().run_once()
        finally:
            CountingRecovery.running -= 1


async def test_jobs_run_once_across_workers(fresh_database: str) -> None:
    """Three job workers (as three `serve` processes would run) for a few seconds, one tick a
    second: one recovery run per tick at most, never two at once."""
    from ciris_billing import installation
    from ciris_billing.db import create_engine
    from ciris_billing.payments.providers import get_payment_provider

    settings = make_settings(fresh_database, jobs_poll_seconds=1)
    engine = create_engine(settings)
    secrets = await installation.load(engine, settings)
    provider = get_payment_provider(settings, engine, secrets)
    workers = [JobWorker(settings, engine, provider) for _ in range(3)]
    for worker in workers:
        worker.recovery = CountingRecovery(settings, engine, provider)
    started = time.monotonic()
    tasks = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        await asyncio.sleep(6)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.dispose()
    ticks = int(time.monotonic() - started) + 1
    assert CountingRecovery.most == 1
    assert 3 <= CountingRecovery.runs <= ticks, (CountingRecovery.runs, ticks)
