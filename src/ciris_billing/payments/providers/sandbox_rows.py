"""The sandbox provider's statements on its own tables (a payment locked, its status and card
kept) and its rows in Stripe's shapes."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select

from ciris_billing.db import (
    sandbox_customers,
    sandbox_payment_methods,
    sandbox_payments,
    utcnow,
)
from ciris_billing.errors import PaymentNotFound
from ciris_billing.payments.providers import stripe_wire
from ciris_billing.payments.providers.base import (
    PaymentResult,
    SavedCard,
)
from ciris_billing.payments.providers.sandbox_cards import (
    card_brand,
    off_session_behaviour,
)


async def _locked(conn: Any, payment_id: str, client_secret: str | None = None) -> Any:
    row = (
        await conn.execute(
            select(sandbox_payments).where(sandbox_payments.c.id == payment_id).with_for_update()
        )
    ).first()
    if row is None or (
        client_secret is not None
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
        and not secrets.compare_digest(row.client_secret.encode(), client_secret.encode())
    ):
        raise PaymentNotFound("No such payment intent (or wrong client_secret)")
    return row


async def _customer_exists(conn: Any, customer_id: str) -> bool:
    found = await conn.execute(
        select(sandbox_customers.c.id).where(sandbox_customers.c.id == customer_id)
    )
    return found.first() is not None


async def _keep_card(conn: Any, payment: Any, card: str) -> None:
    """The card a payment that saves its card is paid with: recorded (brand, last 4, what it
    does when charged later; never its number), attached once the payment succeeds."""
    method_id = "pm_sbx_" + secrets.token_hex(12)
    await conn.execute(
        sandbox_payment_methods.insert().values(
            id=method_id,
            customer_id=payment.customer_id,
            brand=card_brand(card),
            last4=card[-4:],
            behaviour=off_session_behaviour(card),
            created_at=utcnow(),
            attached_at=None,
        )
    )
    await conn.execute(
        sandbox_payments.update()
        .where(sandbox_payments.c.id == payment.id)
        .values(payment_method_id=method_id)
    )


async def _attach_card(conn: Any, payment_id: str) -> None:
    row = (
        await conn.execute(select(sandbox_payments).where(sandbox_payments.c.id == payment_id))
    ).one()
    if row.save_card and row.payment_method_id and not row.off_session:
        await conn.execute(
            sandbox_payment_methods.update()
            .where(sandbox_payment_methods.c.id == row.payment_method_id)
            .values(attached_at=utcnow())
        )


async def _set_status(conn: Any, payment_id: str, status: str, failure: str | None) -> None:
    await conn.execute(
        sandbox_payments.update()
        .where(sandbox_payments.c.id == payment_id)
        .values(status=status, failure_message=failure, updated_at=utcnow())
    )


def _result(row: Any, card: Any = None) -> PaymentResult:
    saved = None
    if card is not None and card.attached_at is not None and row.save_card:
        saved = SavedCard(card.id, card.customer_id, card.brand, card.last4)
    return PaymentResult(
        payment_id=row.id,
        state=stripe_wire.payment_state(row.status, declined=row.failure_message is not None),
        amount_minor=int(row.amount_minor),
        currency=row.currency,
        provider_status=row.status,
        client_secret=row.client_secret,
        metadata=dict(row.metadata),
        failure_message=row.failure_message,
        amount_refunded_minor=int(row.amount_refunded_minor),
        card_brand=row.card_brand,
        card_last4=row.card_last4,
        saved_card=saved,
    )


def _export(payment: PaymentResult) -> dict[str, Any]:
    """The payment as a Stripe-shaped `payment_intent` object (no client secret)."""
    return {
        "id": payment.payment_id,
        "object": "payment_intent",
        "amount": payment.amount_minor,
        "currency": payment.currency.lower(),
        "status": payment.provider_status,
        "metadata": payment.metadata,
        "last_payment_error": (
            {"message": payment.failure_message} if payment.failure_message else None
        ),
    }
