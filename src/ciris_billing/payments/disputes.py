"""Disputes (chargebacks): hold a purchase's unused uses while open; remove them if lost,
release them if won. Each step is one ledger row with a unique external id
(`<dispute>:hold`, `:lost`, `:won`), so however often and in whatever order the events come,
the hold and the closing happen once each.

With refunds (refunds.py): the hold is the purchase's unused uses (never more than its uses not
yet refunded, nor more than the account holds). A refund cannot be made while a dispute is open
or after it was lost, and one that arrives anyway (the provider's dashboard) takes nothing: the
hold covers it. So a won dispute releases only the held uses still unrefunded
(min(held, uses - uses_refunded)); a lost one removes the hold. Either way the uses taken back
from a purchase never exceed its uses.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts, disputes, insert_or_ignore, new_id, purchases, utcnow
from ciris_billing.events.outbox import (
    DISPUTE_CLOSED,
    DISPUTE_OPENED,
    record_available_change,
    record_event,
)
from ciris_billing.ledger import write_credit
from ciris_billing.observability import log
from ciris_billing.payments.providers.base import Dispute
from ciris_billing.payments.refunds import owed_from_holds


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
        await _close(conn, row, state, purchase)
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
            select(accounts.c.paid_uses_remaining, accounts.c.reserved_paid_uses)
            .where(accounts.c.id == purchase.account_id)
            .with_for_update()
        )
    ).one()
    # Uses another open or lost dispute of this purchase already covers are not held twice.
    unused = int(purchase.uses) - int(purchase.uses_refunded) - await _claimed(conn, purchase)
    hold = max(0, min(unused, int(account.paid_uses_remaining)))
    # Held uses are never taken (a hold is a promise): those of the purchase's unused uses that
    # reservations hold are remembered, for a lost dispute to take back like a refund.
    reserved = max(0, min(unused - hold, int(account.reserved_paid_uses)))
    inserted = await conn.execute(
        insert_or_ignore(disputes)
        .values(
            id=new_id("dsp"),
            provider=provider,
            dispute_id=dispute.dispute_id,
            purchase_id=purchase.id,
            state="open",
            held_uses=hold,
            reserved_uses=reserved,
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
        changed = (
            await conn.execute(
                accounts.update()
                .where(accounts.c.id == purchase.account_id)
                .values(
                    paid_uses_remaining=accounts.c.paid_uses_remaining - hold,
                    held_uses=accounts.c.held_uses + hold,
                    updated_at=utcnow(),
                )
                .returning(*accounts.c)
            )
        ).one()
        # Once: only the transaction that inserted the dispute (and its hold) gets here.
        await record_event(
            conn,
            purchase.account_id,
            DISPUTE_OPENED,
            {**_dispute_data(dispute.dispute_id, purchase), "state": "open", "held_uses": hold},
        )
        await record_available_change(conn, changed, -hold)


def _dispute_data(dispute_id: str, purchase: Row[Any]) -> dict[str, Any]:
    return {
        "dispute_id": dispute_id,
        "purchase_id": purchase.id,
        "payment_id": purchase.payment_id,
        "amount_minor": int(purchase.amount_minor),
        "currency": purchase.currency,
    }


async def _claimed(conn: AsyncConnection, purchase: Row[Any], but: str | None = None) -> int:
    """Uses of the purchase held or removed by its open or lost disputes (but one)."""
    rows = await conn.execute(
        select(disputes.c.dispute_id, disputes.c.held_uses).where(
            disputes.c.purchase_id == purchase.id, disputes.c.state.in_(("open", "lost"))
        )
    )
    return sum(int(r.held_uses) for r in rows if r.dispute_id != but)


async def _close(conn: AsyncConnection, row: Row[Any], state: str, purchase: Row[Any]) -> None:
    account_id: str = purchase.account_id
    held = int(row.held_uses)
    dispute_id: str = row.dispute_id
    released = 0
    if state == "won":
        # Only what is still unrefunded: a refund that came during the dispute took no use
        # (the hold covered it), so releasing those uses would give a refunded purchase's back.
        # The purchase row is locked (apply_dispute), so uses_refunded cannot move meanwhile.
        others = await _claimed(conn, purchase, but=dispute_id)
        unrefunded = int(purchase.uses) - int(purchase.uses_refunded) - others
        released = max(0, min(held, unrefunded))
    kept = held - released if state == "won" else 0
    taken, shortfall, owe = 0, 0, 0
    if state == "lost" and int(row.reserved_uses):
        # The uses reservations held when the dispute opened go back like a refund's: what is
        # available now is taken, the rest is shortfall, owed while holds still have it.
        # Safe: the account's row is locked until commit (lock order: purchase, account).
        account = (
            await conn.execute(
                select(
                    accounts.c.paid_uses_remaining,
                    accounts.c.reserved_paid_uses,
                    accounts.c.refund_owed_uses,
                )
                .where(accounts.c.id == account_id)
                .with_for_update()
            )
        ).one()
        due = int(row.reserved_uses)
        taken = min(due, int(account.paid_uses_remaining))
        shortfall = due - taken
        owe = owed_from_holds(account, shortfall)
    notes = f"; {kept} held uses not released: refunded during the dispute" if kept else ""
    if state == "lost" and int(row.reserved_uses):
        notes += f"; {taken} uses held by reservations at its opening taken back"
        notes += f", {shortfall} short ({owe} owed by holds)" if shortfall else ""
    if await write_credit(
        conn,
        account_id=account_id,
        kind=f"dispute_{state}",
        currency=purchase.currency,
        paid=released - taken,
        held=-held,
        shortfall=shortfall,
        external_transaction_id=f"{dispute_id}:{state}",
        description=f"Dispute {dispute_id} {state}{notes}"[:500],
    ):
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(
                paid_uses_remaining=accounts.c.paid_uses_remaining + released - taken,
                held_uses=accounts.c.held_uses - held,
                refund_owed_uses=accounts.c.refund_owed_uses + owe,
                updated_at=utcnow(),
            )
        )
    await conn.execute(
        disputes.update().where(disputes.c.id == row.id).values(state=state, closed_at=utcnow())
    )
    # Once: the dispute's row is locked (apply_dispute) and only an open one is closed.
    await record_event(
        conn,
        account_id,
        DISPUTE_CLOSED,
        {
            **_dispute_data(dispute_id, purchase),
            "state": state,
            "held_uses": held,
            "released_uses": released,
        },
    )
