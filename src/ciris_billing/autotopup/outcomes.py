"""A top-up's outcome: the job's answer from the provider, and the webhook path's.

Split from topups.py (deciding and paying), so that payments/service.py can move a top-up
along when it applies a payment without importing the top-up job (which records its purchase
through payments/purchases.py): no import circle.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.checkout.links import checkout_url
from ciris_billing.config import Settings
from ciris_billing.db import AUTO_TOPUP_IN_FLIGHT, auto_topup_settings, auto_topups, utcnow
from ciris_billing.events.outbox import (
    AUTO_TOPUP_FAILED,
    AUTO_TOPUP_REQUIRES_ACTION,
    AUTO_TOPUP_SUCCEEDED,
    record_event,
)
from ciris_billing.observability import log
from ciris_billing.payments.providers.base import PaymentResult

# Failed top-ups in a row (declines, refusals) after which auto top-up is switched off.
MAX_CONSECUTIVE_FAILURES = 3


async def apply_outcome(
    conn: AsyncConnection,
    settings: Settings | None,
    topup_id: str,
    purchase: Row[Any],
    payment: PaymentResult,
) -> str:
    """Move an in-flight top-up along what the provider says of its payment (the caller holds
    the account's row lock). Every move is a conditional UPDATE from an in-flight status, so
    the job's answer and the webhook, whichever comes second, change nothing and report
    nothing twice."""
    if payment.state in ("succeeded", "processing", "pending"):
        # Paid (or on its way): in flight until the webhook path credits the purchase.
        await conn.execute(
            auto_topups.update()
            .where(auto_topups.c.id == topup_id, auto_topups.c.status == "pending")
            .values(status="processing", updated_at=utcnow())
        )
        return "processing"
    if payment.state == "requires_action":
        moved = (
            await conn.execute(
                auto_topups.update()
                .where(
                    auto_topups.c.id == topup_id,
                    auto_topups.c.status.in_(AUTO_TOPUP_IN_FLIGHT),
                )
                .values(status="requires_action", reason="authentication_required")
                .returning(auto_topups.c.account_id)
            )
        ).first()
        if moved is not None:
            base = (settings.public_base_url if settings else None) or "http://localhost:8000"
            link = (
                checkout_url(base, payment.payment_id, payment.client_secret)
                if payment.client_secret
                else None
            )
            await record_event(
                conn,
                moved.account_id,
                AUTO_TOPUP_REQUIRES_ACTION,
                {
                    "auto_topup_id": topup_id,
                    "purchase_id": purchase.id,
                    "payment_id": payment.payment_id,
                    "amount_minor": int(purchase.amount_minor),
                    "currency": purchase.currency,
                    "uses": int(purchase.uses),
                    "checkout_url": link,
                },
            )
            log.info("auto_topup_requires_action", auto_topup_id=topup_id)
        return "requires_action"
    await fail(conn, topup_id, "declined", payment.failure_message, purchase, payment)
    return "failed"


async def fail(
    conn: AsyncConnection,
    topup_id: str,
    reason: str,
    message: str | None,
    purchase: Row[Any] | None = None,
    payment: PaymentResult | None = None,
) -> None:
    moved = (
        await conn.execute(
            auto_topups.update()
            .where(auto_topups.c.id == topup_id, auto_topups.c.status.in_(AUTO_TOPUP_IN_FLIGHT))
            .values(
                status="failed",
                reason=reason,
                failure_message=(message or "")[:500] or None,
                updated_at=utcnow(),
            )
            .returning(auto_topups.c.account_id, auto_topups.c.purchase_id)
        )
    ).first()
    if moved is None:
        return  # reported already
    # Counted once per failed top-up (the conditional UPDATE above); switched off at the limit.
    counted = (
        await conn.execute(
            auto_topup_settings.update()
            .where(auto_topup_settings.c.account_id == moved.account_id)
            .values(
                consecutive_failures=auto_topup_settings.c.consecutive_failures + 1,
                updated_at=utcnow(),
            )
            .returning(auto_topup_settings.c.consecutive_failures)
        )
    ).one()
    failures = int(counted.consecutive_failures)
    switched_off = failures >= MAX_CONSECUTIVE_FAILURES
    if switched_off:
        await conn.execute(
            auto_topup_settings.update()
            .where(auto_topup_settings.c.account_id == moved.account_id)
            .values(enabled=False, disabled_reason=f"{failures}_consecutive_failures")
        )
    await record_event(
        conn,
        moved.account_id,
        AUTO_TOPUP_FAILED,
        {
            "auto_topup_id": topup_id,
            "purchase_id": moved.purchase_id,
            "payment_id": payment.payment_id if payment else None,
            "reason": reason,
            "failure_message": message,
            "consecutive_failures": failures,
            "auto_topup_enabled": not switched_off,
        },
    )
    log.warning(
        "auto_topup_failed",
        auto_topup_id=topup_id,
        account_id=moved.account_id,
        reason=reason,
        consecutive_failures=failures,
    )
    if switched_off:
        log.warning(
            "auto_topup_disabled",
            account_id=moved.account_id,
            reason="consecutive_failures",
            consecutive_failures=failures,
        )


async def after_payment(
    conn: AsyncConnection, purchase: Row[Any], payment: PaymentResult, credited: bool
) -> None:
    """The webhook path applied a payment to a purchase (same transaction): when it pays a
    top-up, move the top-up along. Credited: succeeded (also after a requires_action the
    customer completed on the payment page), the failure count starts again."""
    topup = (
        await conn.execute(select(auto_topups).where(auto_topups.c.purchase_id == purchase.id))
    ).first()
    if topup is None:
        return
    if credited:
        moved = (
            await conn.execute(
                auto_topups.update()
                .where(
                    auto_topups.c.id == topup.id,
                    auto_topups.c.status.in_((*AUTO_TOPUP_IN_FLIGHT, "requires_action")),
                )
                .values(status="succeeded", reason=None, updated_at=utcnow())
                .returning(auto_topups.c.id)
            )
        ).first()
        if moved is None:
            return
        await conn.execute(
            auto_topup_settings.update()
            .where(auto_topup_settings.c.account_id == topup.account_id)
            .values(consecutive_failures=0, updated_at=utcnow())
        )
        await record_event(
            conn,
            topup.account_id,
            AUTO_TOPUP_SUCCEEDED,
            {
                "auto_topup_id": topup.id,
                "purchase_id": purchase.id,
                "payment_id": purchase.payment_id,
                "amount_minor": int(purchase.amount_minor),
                "currency": purchase.currency,
                "uses": int(purchase.uses),
            },
        )
        log.info("auto_topup_succeeded", auto_topup_id=topup.id, account_id=topup.account_id)
        return
    if payment.state in ("failed", "canceled"):
        await fail(conn, topup.id, "declined", payment.failure_message, purchase, payment)
