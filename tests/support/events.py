"""The outbox as tests read it: an account's events, in sequence order."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.db import accounts, events


async def events_of(engine: AsyncEngine, external_id: str) -> list[dict[str, Any]]:
    """The identity's account's events ({id, type, sequence, data}), oldest first."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(events.c.id, events.c.type, events.c.sequence, events.c.data)
            .join(accounts, accounts.c.id == events.c.account_id)
            .where(accounts.c.external_id == external_id)
            .order_by(events.c.sequence)
        )
        return [dict(row._mapping) for row in rows]


def types(found: list[dict[str, Any]]) -> list[str]:
    return [event["type"] for event in found]
