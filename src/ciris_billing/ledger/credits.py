"""The `credits` ledger: one immutable row for every change that is not a charge."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import credits, insert_or_ignore, new_id, utcnow


async def write_credit(
    conn: AsyncConnection,
    *,
    account_id: str,
    kind: str,
    currency: str,
    free: int = 0,
    paid: int = 0,
    held: int = 0,
    shortfall: int = 0,
    amount_minor: int = 0,
    external_transaction_id: str | None = None,
    description: str | None = None,
    idempotency_key: str | None = None,
    api_key_id: str | None = None,
    lot_ids: list[str] | None = None,
    lot_uses: list[int] | None = None,
    credit_id: str | None = None,
) -> bool:
    """Insert one ledger row; False when its `external_transaction_id` was already recorded.

    The unique external id is what makes money movements happen once: the caller changes the
    account's counters only when this returns True, in the same transaction.
    """
    statement = insert_or_ignore(credits).values(
        id=credit_id or new_id("cr"),
        account_id=account_id,
        kind=kind,
        free_uses_delta=free,
        paid_uses_delta=paid,
        held_uses_delta=held,
        shortfall_uses=shortfall,
        amount_minor=amount_minor,
        currency=currency,
        external_transaction_id=external_transaction_id,
        description=description,
        idempotency_key=idempotency_key,
        api_key_id=api_key_id,
        lot_ids=lot_ids,
        lot_uses=lot_uses,
        created_at=utcnow(),
    )
    inserted = await conn.execute(statement.returning(credits.c.id))
    return inserted.first() is not None
