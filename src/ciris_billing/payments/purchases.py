"""Purchases: the offer, recording a provider's payment as a purchase, looking purchases up by
their provider payment, and their status as the API shows it. (Shared by payments/service.py
and autotopup/topups.py, neither importing the other.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import insert_or_ignore, purchases, utcnow
from ciris_billing.errors import PurchaseNotFound
from ciris_billing.payments.providers.base import PaymentResult
from ciris_billing.pricing import Pricing

# The guide documents Stripe's word for a purchase that waits for its payment; the API keeps
# that promise, whatever we store (db.PURCHASE_STATUSES). Every other status reads the same.
_API_STATUSES = {"pending": "requires_payment_method"}
_STORED_STATUSES = {shown: stored for stored, shown in _API_STATUSES.items()}


def api_status(stored: str) -> str:
    """A stored purchase status as the API (and the operator's CLI) shows it."""
    return _API_STATUSES.get(stored, stored)


def stored_status(shown: str) -> str:
    """The stored purchase status for one the API shows (e.g. a CLI filter)."""
    return _STORED_STATUSES.get(shown, shown)


async def find_purchase(conn: AsyncConnection, provider: str, payment_id: str) -> Row[Any] | None:
    result = await conn.execute(
        select(purchases).where(
            purchases.c.provider == provider, purchases.c.payment_id == payment_id
        )
    )
    return result.first()


async def get_purchase(conn: AsyncConnection, provider: str, payment_id: str) -> Row[Any]:
    row = await find_purchase(conn, provider, payment_id)
    if row is None:
        raise PurchaseNotFound(f"No purchase for payment {payment_id}")
    return row


@dataclass(frozen=True, slots=True)
class Offer:
    amount_minor: int
    currency: str
    uses: int
    # The catalog (issue 24): the pack, its lot's expiry, the promotion code that priced it.
    pack_id: str = "default"
    lot_expires_in_days: int | None = None
    promotion_code: str | None = None
    discount_minor: int = 0  # what the promotion code took off the pack's price

    @classmethod
    def from_pricing(cls, pricing: Pricing) -> Offer:
        return cls(
            pricing.price_per_purchase_minor, pricing.currency, pricing.paid_uses_per_purchase
        )


async def record_purchase(
    conn: AsyncConnection,
    *,
    purchase_id: str,
    account_id: str,
    provider: str,
    payment: PaymentResult,
    offer: Offer,
    customer_email: str | None,
) -> Row[Any]:
    """Insert the purchase for a payment the provider created (once per provider payment)."""
    now = utcnow()
    await conn.execute(
        insert_or_ignore(purchases).values(
            id=purchase_id,
            account_id=account_id,
            provider=provider,
            payment_id=payment.payment_id,
            amount_minor=offer.amount_minor,
            currency=offer.currency,
            uses=offer.uses,
            pack_id=offer.pack_id,
            lot_expires_in_days=offer.lot_expires_in_days,
            promotion_code=offer.promotion_code,
            discount_minor=offer.discount_minor,
            status=payment.state,
            customer_email=customer_email,
            failure_message=None,
            created_at=now,
            updated_at=now,
            credited_at=None,
        )
    )
    return await get_purchase(conn, provider, payment.payment_id)
