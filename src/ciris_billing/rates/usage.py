"""An account's rated usage, by feature (what the portal shows)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import charges


async def usage_by_feature(conn: AsyncConnection, account_id: str) -> list[Any]:
    """Per feature the account was charged by: total quantity, uses and charges (feature
    order). Reads the account's charges through their (account_id, created_at) index."""
    query = (
        select(
            charges.c.feature,
            func.sum(charges.c.quantity).label("quantity"),
            func.sum(charges.c.uses).label("uses"),
            func.count().label("charges"),
        )
        .where(charges.c.account_id == account_id, charges.c.feature.is_not(None))
        .group_by(charges.c.feature)
        .order_by(charges.c.feature)
    )
    return list(await conn.execute(query))
