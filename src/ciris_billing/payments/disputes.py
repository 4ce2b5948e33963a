"""Disputes (chargebacks): hold a purchase's unused uses while open; remove them if lost,
release them if won. Each step is one ledger row with a unique external id
(`<dispute>:hold`, `:lost`, `:won`), so however often and in whatever order the events come,
the hold and the closing happen once each.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts, disputes, insert_or_ignore, new_id, purchases, utcnow
from ciris_billing.ledger import write_credit
from ciris_billing.observability import log
from ciris_billing.payments.providers.base import Dispute


async def apply_dispute(conn: AsyncConnection, provider: str, dispute: Dispute) -> str:
    """Bring our books in line with the dispute's current state. Returns the outcome."""
    purchase = (
        await conn.execute(
            select(purchases)
            .where(purchases.c.provider == provider, purchases.c.payment_id == dispute.payment_id)
            .with_for_update()
        )
    ).first()
    if purchase is None:
        return "not_ours"
    if purchase.credited_at is None:
        return "not_credited"
    row = (
        await conn.execute(
            select(disputes)
            .where(disputes.c.provider == provider, disputes.c.dispute_id == dispute.dispute_id)
            .with_for_update()
        )
    ).first()
    outcome = "unchanged"
    if row is None:
        await _hold(conn, provider, dispute, purchase)
        outcome = "held"
        row = (
            await conn.execute(
                select(disputes).where(
                    disputes.c.provider == provider, disputes.c.dispute_id == dispute.dispute_id
                )
            )
        ).one()
    state = dispute.state
    if row.state == "open" and state != "open":
        await _close(conn, row, state, purchase.account_id, purchase.currency)
        outcome = f"dispute_{state}"
    log.info(
        f"{provider}_dispute_applied",
        dispute_id=dispute.dispute_id,
        payment_id=dispute.payment_id,
        state=dispute.state,
        outcome=outcome,
    )
    return outcome


async def _hold(conn: AsyncConnection, provider: str, dispute: Dispute, purchase: Row[Any]) -> None:
    account = (
        await conn.execute(
            select(accounts.c.paid_uses_remaining)
            .where(accounts.c.id == purchase.account_id)
            .with_for_update()
        )
    ).one()
    unused = int(purchase.uses) - int(purchase.uses_refunded)
    hold = max(0, min(unused, int(account.paid_uses_remaining)))
    inserted = await conn.execute(
        insert_or_ignore(conn, disputes)
        .values(
            id=new_id("dsp"),
            provider=provider,
            dispute_id=dispute.dispute_id,
            purchase_id=purchase.id,
            state="open",
            held_uses=hold,
            created_at=utcnow(),
            closed_at=None,
        )
        .returning(disputes.c.id)
    )
    if inserted.first() is None:
        return
    if await write_credit(
        conn,
        account_id=purchase.account_id,
        kind="dispute_hold",
        currency=purchase.currency,
        paid=-hold,
        held=hold,
        external_transaction_id=f"{dispute.dispute_id}:hold",
        description=f"Held while dispute {dispute.dispute_id} is open",
    ):
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == purchase.account_id)
            .values(
                paid_uses_remaining=accounts.c.paid_uses_remaining - hold,
                held_uses=accounts.c.held_uses + hold,
                updated_at=utcnow(),
            )
        )


async def _close(
    conn: AsyncConnection, row: Row[Any], state: str, account_id: str, currency: str
) -> None:
    held = int(row.held_uses)
    dispute_id: str = row.dispute_id
    released = held if state == "won" else 0
    if await write_credit(
        conn,
        account_id=account_id,
        kind=f"dispute_{state}",
        currency=currency,
        paid=released,
        held=-held,
        external_transaction_id=f"{dispute_id}:{state}",
        description=f"Dispute {dispute_id} {state}",
    ):
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(
                paid_uses_remaining=accounts.c.paid_uses_remaining + released,
                held_uses=accounts.c.held_uses - held,
                updated_at=utcnow(),
            )
        )
    await conn.execute(
        disputes.update().where(disputes.c.id == row.id).values(state=state, closed_at=utcnow())
    )
