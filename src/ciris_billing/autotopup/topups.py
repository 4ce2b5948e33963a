"""Top-ups: one off-session payment of a pack per balance.low crossing.

Why a job reacting to balance.low rows, not a hook in the charge: the charge is one batched
statement on the hot path (accounts/hot/writer.py) that already writes the crossing's event
in its own transaction. That event row is the durable, exactly-once record that the balance
crossed; a job turning it into a top-up adds nothing to the charge (no extra statement, no
provider call near a request) and survives restarts (the rows are the state; the job queue
runs the step once at a time across workers). The price is up to JOBS_POLL_SECONDS of delay.

How "exactly one" holds, by construction:
- one top-up per crossing: `auto_topups.crossing_event_id` is unique;
- at most one in flight per account: a unique partial index on status pending/processing;
- the monthly cap and the decision itself are taken under the account's row lock (the one
  lock order: a purchase's row, then its account's, then the top-up's and the settings'), so
  two deciders serialize;
- the provider is asked with an idempotency key derived from the account and the crossing,
  but our own idempotency does not rely on it: each call is counted (committed) first, and
  a second call first asks the provider for the payment the first one may have made
  (`find_payment`), so a lost answer never becomes a second payment;
- uses are credited only by the webhook path (payments.service.apply_payment, the inbox and
  reconcile), which calls `after_payment` in its own transaction: the top-up is a purchase
  like any other, credited once under the unique credits.external_transaction_id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.autotopup.outcomes import MAX_CONSECUTIVE_FAILURES as MAX_CONSECUTIVE_FAILURES
from ciris_billing.autotopup.outcomes import after_payment as after_payment
from ciris_billing.autotopup.outcomes import apply_outcome, fail
from ciris_billing.config import Settings
from ciris_billing.db import (
    AUTO_TOPUP_IN_FLIGHT,
    accounts,
    auto_topup_settings,
    auto_topups,
    insert_or_ignore,
    new_id,
    purchases,
    utcnow,
)
from ciris_billing.errors import ProviderError, ProviderUnavailable
from ciris_billing.events.outbox import (
    AUTO_TOPUP_FAILED,
    record_event,
    threshold_of,
)
from ciris_billing.observability import log
from ciris_billing.payments.providers.base import (
    OffSessionPayment,
    PaymentProvider,
    PaymentResult,
)
from ciris_billing.payments.purchases import Offer, record_purchase
from ciris_billing.pricing import Pricing
from ciris_billing.unit_of_work import unit_of_work

# A provider that cannot be reached is asked again, this many times at most.
MAX_ATTEMPTS = 10
BATCH = 100


@dataclass
class TopupReport:
    started: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)


def purchase_id_for(crossing_event_id: str) -> str:
    return "pur_" + hashlib.sha256(f"auto-topup:{crossing_event_id}".encode()).hexdigest()[:24]


def month_start(now: datetime) -> datetime:
    return datetime(now.year, now.month, 1, tzinfo=UTC)


# --- deciding -----------------------------------------------------------------------------


async def due_crossings(engine: AsyncEngine, limit: int = BATCH) -> list[Row[Any]]:
    """For each account with auto top-up on, its latest balance.low crossing since it was
    switched on, when no top-up was decided for it yet. (Older crossings of the same account
    are superseded by the latest: one top-up per low balance, not per backlog.)"""
    async with engine.connect() as conn:
        result = await conn.execute(
            text(
                """
                SELECT s.account_id, e.id AS event_id
                FROM auto_topup_settings s
                CROSS JOIN LATERAL (
                    SELECT id FROM events
                    WHERE account_id = s.account_id AND type = 'balance.low'
                      AND created_at >= s.enabled_at
                    ORDER BY sequence DESC LIMIT 1
                ) e
                WHERE s.enabled
                  AND NOT EXISTS (SELECT 1 FROM auto_topups t WHERE t.crossing_event_id = e.id)
                LIMIT :limit
                """
            ),
            {"limit": limit},
        )
        return list(result)


async def decide(engine: AsyncEngine, settings: Settings, account_id: str, event_id: str) -> str:
    """Turn one crossing into a pending top-up, or a skipped one (and say why)."""
    now = utcnow()
    async with unit_of_work(engine) as work:
        conn = await work.connection()
        # The account's row first (the one lock order), then its settings: one decision per
        # account at a time, and the monthly count below cannot race another decision.
        account = (
            await conn.execute(
                select(accounts).where(accounts.c.id == account_id).with_for_update(key_share=True)
            )
        ).one()
        found = (
            await conn.execute(
                select(auto_topup_settings)
                .where(auto_topup_settings.c.account_id == account_id)
                .with_for_update()
            )
        ).one()
        in_flight = await conn.scalar(
            select(func.count())
            .select_from(auto_topups)
            .where(
                auto_topups.c.account_id == account_id,
                auto_topups.c.status.in_(AUTO_TOPUP_IN_FLIGHT),
            )
        )
        if in_flight:
            return "waiting"  # this crossing is decided once the one in flight is over
        reason: str | None = None
        available = int(account.free_uses_remaining) + int(account.paid_uses_remaining)
        if not found.enabled or found.payment_method_id is None:
            reason = "switched_off"
        elif account.status != "active":
            reason = "account_suspended"
        elif available >= await threshold_of(conn, account_id):
            reason = "balance_recovered"
        else:
            this_month = await conn.scalar(
                select(func.count())
                .select_from(auto_topups)
                .where(
                    auto_topups.c.account_id == account_id,
                    auto_topups.c.created_at >= month_start(now),
                    auto_topups.c.status != "skipped",
                )
            )
            if int(this_month or 0) >= settings.auto_topup_max_per_month:
                reason = "monthly_cap"
        topup_id = new_id("atu")
        # Safe: unique crossing_event_id (one top-up per crossing) and the unique partial index
        # on in-flight top-ups (one per account): a conflicting insert adds nothing.
        inserted = await conn.execute(
            insert_or_ignore(auto_topups)
            .values(
                id=topup_id,
                account_id=account_id,
                crossing_event_id=event_id,
                status="skipped" if reason else "pending",
                purchase_id=purchase_id_for(event_id),
                idempotency_key=f"auto-topup-{account_id}-{event_id}",
                attempts=0,
                reason=reason,
                created_at=now,
                updated_at=now,
            )
            .returning(auto_topups.c.id)
        )
        if inserted.first() is None:
            return "already_decided"
        if reason == "monthly_cap":
            # The app should know why no top-up came (not a failure of the card: not counted).
            await record_event(
                conn,
                account_id,
                AUTO_TOPUP_FAILED,
                {
                    "auto_topup_id": topup_id,
                    "reason": "monthly_cap",
                    "max_per_month": settings.auto_topup_max_per_month,
                    "auto_topup_enabled": True,
                },
            )
            log.warning("auto_topup_capped", account_id=account_id, auto_topup_id=topup_id)
        return reason or "started"


# --- paying --------------------------------------------------------------------------------


async def due_payments(engine: AsyncEngine, now: datetime, limit: int = BATCH) -> list[str]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(auto_topups.c.id)
            .where(
                auto_topups.c.status == "pending",
                auto_topups.c.next_attempt_at.is_(None) | (auto_topups.c.next_attempt_at <= now),
            )
            .order_by(auto_topups.c.created_at)
            .limit(limit)
        )
        return [row.id for row in result]


async def pay(
    engine: AsyncEngine,
    provider: PaymentProvider,
    pricing: Pricing,
    settings: Settings,
    topup_id: str,
) -> str:
    """Ask the provider for the pending top-up's payment, then record what it answered."""
    now = utcnow()
    async with unit_of_work(engine) as work:
        conn = await work.connection()
        # Counted (and committed) before the call: a second call knows a first may have
        # reached the provider. Only a pending top-up is taken.
        topup = (
            await conn.execute(
                auto_topups.update()
                .where(auto_topups.c.id == topup_id, auto_topups.c.status == "pending")
                .values(attempts=auto_topups.c.attempts + 1, updated_at=now)
                .returning(*auto_topups.c)
            )
        ).first()
        card = None
        if topup is not None:
            card = (
                await conn.execute(
                    select(auto_topup_settings).where(
                        auto_topup_settings.c.account_id == topup.account_id
                    )
                )
            ).one()
    if topup is None or card is None:
        return "not_pending"
    if not card.enabled or card.payment_method_id is None or card.provider != provider.name:
        return await _close(engine, topup, "skipped", "switched_off", None)
    try:
        payment = None
        if topup.attempts > 1:
            payment = await provider.find_payment(card.customer_id, topup.purchase_id)
        if payment is None:
            payment = await provider.pay_off_session(
                OffSessionPayment(
                    amount_minor=pricing.price_per_purchase_minor,
                    currency=pricing.currency,
                    purchase_id=topup.purchase_id,
                    account_id=topup.account_id,
                    customer_id=card.customer_id,
                    payment_method_id=card.payment_method_id,
                    idempotency_key=topup.idempotency_key,
                )
            )
    except ProviderUnavailable:
        if topup.attempts >= MAX_ATTEMPTS:
            return await _close(engine, topup, "failed", "provider_unavailable", None, settings)
        delay = timedelta(seconds=settings.jobs_poll_seconds * 2 ** min(topup.attempts, 10))
        async with engine.begin() as conn:
            await conn.execute(
                auto_topups.update()
                .where(auto_topups.c.id == topup.id, auto_topups.c.status == "pending")
                .values(next_attempt_at=utcnow() + min(delay, timedelta(hours=1)))
            )
        log.warning("auto_topup_provider_unavailable", auto_topup_id=topup.id)
        return "retry"
    except ProviderError as exc:
        return await _close(engine, topup, "failed", "provider_refused", exc.detail, settings)
    return await _record(engine, provider, pricing, settings, topup, payment)


async def _record(
    engine: AsyncEngine,
    provider: PaymentProvider,
    pricing: Pricing,
    settings: Settings,
    topup: Row[Any],
    payment: PaymentResult,
) -> str:
    async with unit_of_work(engine) as work:
        conn = await work.connection()
        purchase = await record_purchase(
            conn,
            purchase_id=topup.purchase_id,
            account_id=topup.account_id,
            provider=provider.name,
            payment=payment,
            offer=Offer.from_pricing(pricing),
            customer_email=None,
        )
        # The one lock order of money in and out: the purchase's row, then its account's (as
        # crediting, refunds and disputes take them), then the top-up and its settings.
        await conn.execute(
            select(purchases.c.id).where(purchases.c.id == purchase.id).with_for_update()
        )
        await _lock_account(conn, topup.account_id)
        await conn.execute(
            auto_topups.update()
            .where(auto_topups.c.id == topup.id)
            .values(payment_id=payment.payment_id, updated_at=utcnow())
        )
        outcome = await apply_outcome(conn, settings, topup.id, purchase, payment)
    log.info(
        "auto_topup_paid",
        auto_topup_id=topup.id,
        account_id=topup.account_id,
        payment_id=payment.payment_id,
        state=payment.state,
    )
    return outcome


async def _lock_account(conn: AsyncConnection, account_id: str) -> None:
    # The account's row before the top-up's and its settings' (after the purchase's, when there
    # is one): record_event and the webhook's credit take them in that order too, so a top-up's
    # outcome and its credit never wait on each other in a cycle.
    await conn.execute(
        select(accounts.c.id).where(accounts.c.id == account_id).with_for_update(key_share=True)
    )


async def _close(
    engine: AsyncEngine,
    topup: Row[Any],
    status: str,
    reason: str,
    message: str | None,
    settings: Settings | None = None,
) -> str:
    async with unit_of_work(engine) as work:
        conn = await work.connection()
        await _lock_account(conn, topup.account_id)
        if status == "failed":
            await fail(conn, topup.id, reason, message)
        else:
            await conn.execute(
                auto_topups.update()
                .where(auto_topups.c.id == topup.id, auto_topups.c.status.in_(AUTO_TOPUP_IN_FLIGHT))
                .values(status=status, reason=reason, updated_at=utcnow())
            )
    return reason


# --- the job's step -------------------------------------------------------------------------


async def run_once(
    engine: AsyncEngine, provider: PaymentProvider, pricing: Pricing, settings: Settings
) -> TopupReport:
    """Decide top-ups for new crossings, then pay the pending ones (jobs.py, every tick)."""
    report = TopupReport()
    for row in await due_crossings(engine):
        decided = await decide(engine, settings, row.account_id, row.event_id)
        if decided == "started":
            report.started += 1
        else:
            report.skipped[decided] = report.skipped.get(decided, 0) + 1
    for topup_id in await due_payments(engine, utcnow()):
        outcome = await pay(engine, provider, pricing, settings, topup_id)
        report.outcomes[outcome] = report.outcomes.get(outcome, 0) + 1
    return report
