"""Looking purchases up by their provider payment, and their status as the API shows it."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import purchases
from ciris_billing.errors import PurchaseNotFound

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
