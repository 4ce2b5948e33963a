"""Looking purchases up by their provider payment."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import purchases
from ciris_billing.errors import BillingError


class PurchaseNotFound(BillingError):
    status_code = 404
    code = "purchase_not_found"


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
