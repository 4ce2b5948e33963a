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

from sqlalchemy import Row, func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import (
    accounts,
    credits,
    disputes,
    insert_or_ignore,
    new_id,
    purchases,
    reservations,
    utcnow,
)
from ciris_billing.events.outbox import (
    DISPUTE_CLOSED,
    DISPUTE_OPENED,
    record_available_change,
    record_event,
)
from ciris_billing.ledger import moves
from ciris_billing.ledger.moves import held_of_lot, left_of, purchase_lot
from ciris_billing.ledger.wallet import lock_wallet
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
    lot_id = await purchase_lot(conn, purchase.id)
    # The account's active holds that hold uses of the purchase's lot and no dispute is owed
    # yet, locked before the account's row: the lock order of every hold transition
    # (reservation, then account), so a capture, release or expiry racing this opening waits
    # for it (or it for them), never deadlocks, and the holds read here stay held until this
    # transaction ends.
    holds = await held_of_lot(conn, purchase.account_id, lot_id, lock=True) if lot_id else []
    owing = await _owing(conn, purchase.account_id)
    holds = [(held_id, uses) for held_id, uses in holds if held_id not in owing]
    wallet = await lock_wallet(conn, purchase.account_id)
    account = (
        await conn.execute(
            select(accounts.c.reserved_paid_uses, accounts.c.refund_owed_uses).where(
                accounts.c.id == purchase.account_id
            )
        )
    ).one()
    # Uses another open or lost dispute of this purchase already covers are not held twice.
    unused = int(purchase.uses) - int(purchase.uses_refunded) - await _claimed(conn, purchase)
    # Only the purchase's own lot is held from (issue 23).
    hold = max(0, min(unused, left_of(wallet, lot_id) if lot_id else 0))
    # Held uses are never taken (a hold is a promise): those of the purchase's unused uses that
    # reservations hold (of its lot) are owed to the dispute, each reservation's share on its
    # row, and go into the dispute's hold when the reservation ends (hold_owed_uses), so they
    # are never spendable while the dispute is open (issue 21 finding 2). Not those a refund
    # is owed.
    room = int(account.reserved_paid_uses) - int(account.refund_owed_uses)
    reserved = max(0, min(unused - hold, room, sum(uses for _, uses in holds)))
    row_id = new_id("dsp")
    inserted = await conn.execute(
        insert_or_ignore(disputes)
        .values(
            id=row_id,
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
    left = reserved
    for held_id, held_uses in holds:
        share = min(left, held_uses)
        if share <= 0:
            break
        left -= share
        await conn.execute(
            reservations.update()
            .where(reservations.c.id == held_id)
            .values(owed_dispute_id=row_id, owed_uses=share)
        )
    changed = await moves.apply(
        conn,
        purchase.account_id,
        moves.Move(
            kind="dispute_hold",
            currency=purchase.currency,
            held=hold,
            external_transaction_id=f"{dispute.dispute_id}:hold",
            description=f"Held while dispute {dispute.dispute_id} is open",
            lots={lot_id: -hold} if lot_id and hold else {},
        ),
        wallet=wallet,
    )
    if changed is not None:
        # Once: only the transaction that inserted the dispute (and its hold) gets here.
        await record_event(
            conn,
            purchase.account_id,
            DISPUTE_OPENED,
            {**_dispute_data(dispute.dispute_id, purchase), "state": "open", "held_uses": hold},
        )
        await record_available_change(conn, changed, -hold)


async def _owing(conn: AsyncConnection, account_id: str) -> set[str]:
    """The account's open holds already owing uses to a dispute."""
    rows = await conn.execute(
        select(reservations.c.id).where(
            reservations.c.account_id == account_id,
            reservations.c.status == "held",
            reservations.c.owed_uses > 0,
        )
    )
    return {row.id for row in rows}


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
        select(disputes.c.dispute_id, disputes.c.held_uses, disputes.c.state).where(
            disputes.c.purchase_id == purchase.id, disputes.c.state.in_(("open", "lost"))
        )
    )
    claimed = 0
    for r in rows:
        if r.dispute_id != but:
            paid_in = await _paid_in(conn, r.dispute_id) if r.state == "open" else 0
            claimed += int(r.held_uses) + paid_in
    return claimed


def _owed_row_id(dispute_id: str, reservation_id: str) -> str:
    return f"{dispute_id}:owed:{reservation_id}"


async def _paid_in(conn: AsyncConnection, dispute_id: str) -> int:
    """Uses that came into an open dispute's hold from reservations that ended (their ledger
    rows, `<dispute>:owed:<reservation>`); on closing they are added to its held_uses."""
    pattern = _owed_row_id(dispute_id, "").replace("%", r"\%").replace("_", r"\_") + "%"
    total = await conn.scalar(
        select(func.coalesce(func.sum(credits.c.held_uses_delta), 0)).where(
            credits.c.kind == "dispute_hold",
            credits.c.external_transaction_id.like(pattern, escape="\\"),
        )
    )
    return int(total or 0)


async def hold_owed_uses(
    conn: AsyncConnection,
    account_id: str,
    ending: dict[str, tuple[Row[Any], int]],
    paid_back: int,
    why: str,
) -> int:
    """Reservations ended and GAVE BACK their uses to their lots already (the wallet): of
    those, the uses each owed to a still open dispute (`owed_uses`, set when the dispute
    opened) go into that dispute's hold, taken from the dispute's purchase lot through the
    money core (a `dispute_hold` row naming the lot, paid -n, held +n, counters moved here:
    the caller moves none). `ending`: reservation id -> (its row, paid uses it gave back);
    `paid_back`: how many of those are free to go (after a refund's owed uses). Returns how
    many moved. The caller holds the account's row lock (a dispute closes only under it, so
    one read open here stays open until commit)."""
    moved = 0
    wallet = await lock_wallet(conn, account_id)
    for row, given_back in ending.values():
        owed = int(row.owed_uses)
        if not owed or row.owed_dispute_id is None or paid_back - moved <= 0:
            continue
        dispute = (
            await conn.execute(
                select(
                    disputes.c.dispute_id,
                    disputes.c.state,
                    purchases.c.id.label("purchase_id"),
                    purchases.c.currency,
                )
                .join(purchases, purchases.c.id == disputes.c.purchase_id)
                .where(disputes.c.id == row.owed_dispute_id)
            )
        ).first()
        if dispute is None or dispute.state != "open":
            continue  # closed: a lost one made what was still owed a refund's owed uses
        lot_id = await purchase_lot(conn, dispute.purchase_id)
        room = left_of(wallet, lot_id) if lot_id else 0
        share = min(owed, given_back, paid_back - moved, room)
        if share <= 0 or lot_id is None:
            continue
        # Once: a reservation ends once, so its row id makes this ledger row unique.
        after = await moves.apply(
            conn,
            account_id,
            moves.Move(
                kind="dispute_hold",
                currency=dispute.currency,
                held=share,
                external_transaction_id=_owed_row_id(dispute.dispute_id, row.id),
                description=f"{share} paid uses owed to dispute {dispute.dispute_id}, held "
                f"when reservation {row.id} ended ({why})"[:500],
                lots={lot_id: -share},
            ),
            wallet=wallet,
        )
        if after is not None:
            moved += share
            wallet = await lock_wallet(conn, account_id)
    return moved


async def _close(conn: AsyncConnection, row: Row[Any], state: str, purchase: Row[Any]) -> None:
    account_id: str = purchase.account_id
    dispute_id: str = row.dispute_id
    # The account's row first (lock order: purchase, dispute, account): a reservation ending
    # meanwhile (hold_owed_uses, under this lock) has put its owed uses in the hold and
    # committed, or sees this dispute closed; so what came in is read exactly.
    await conn.execute(select(accounts.c.id).where(accounts.c.id == account_id).with_for_update())
    paid_in = await _paid_in(conn, dispute_id)
    held = int(row.held_uses) + paid_in
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
    lot_id = await purchase_lot(conn, purchase.id)
    # Safe: the account's row is locked until commit (lock order: purchase, account).
    wallet = await lock_wallet(conn, account_id)
    if state == "lost" and int(row.reserved_uses) > paid_in:
        # The uses reservations held (of the purchase's lot) when the dispute opened go back
        # like a refund's: what the lot has now is taken, the rest is shortfall, owed while
        # holds still have it.
        account = (
            await conn.execute(
                select(accounts.c.reserved_paid_uses, accounts.c.refund_owed_uses).where(
                    accounts.c.id == account_id
                )
            )
        ).one()
        # What came into the hold from ended reservations is no longer due.
        due = max(0, int(row.reserved_uses) - paid_in)
        taken = min(due, left_of(wallet, lot_id) if lot_id else 0)
        shortfall = due - taken
        still_held = (
            sum(uses for _, uses in await held_of_lot(conn, account_id, lot_id)) if lot_id else 0
        )
        owe = min(still_held, owed_from_holds(account, shortfall))
    notes = f"; {kept} held uses not released: refunded during the dispute" if kept else ""
    if state == "lost" and int(row.reserved_uses) > paid_in:
        notes += f"; {taken} uses held by reservations at its opening taken back"
        notes += f", {shortfall} short ({owe} owed by holds)" if shortfall else ""
    # A won dispute gives the released uses back to the purchase's lot (back into the wallet
    # if the lot had left it); a lost one takes the reservations' share from it.
    await moves.apply(
        conn,
        account_id,
        moves.Move(
            kind=f"dispute_{state}",
            currency=purchase.currency,
            held=-held,
            shortfall=shortfall,
            owed=owe,
            external_transaction_id=f"{dispute_id}:{state}",
            description=f"Dispute {dispute_id} {state}{notes}"[:500],
            lots={lot_id: released - taken} if lot_id and released - taken else {},
        ),
        wallet=wallet,
    )
    await conn.execute(
        disputes.update()
        .where(disputes.c.id == row.id)
        .values(state=state, held_uses=held, closed_at=utcnow())
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
