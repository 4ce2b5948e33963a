"""Lots closed before they are used up: expired (the expiry job) or voided (an operator).

Cold, like wallet.py, and under the same lock: the account row (`lock_wallet`, FOR UPDATE),
then the lot's own row. What the lot has left at that moment is written as ONE credits row
(kind `expired` or `void`, lot_ids=[lot], lot_uses=[-left], the counters' deltas), its wallet
slot goes to 0 and the counters down by as much; the lot leaves the wallet (status `expired`
or `voided`, closed_at) unless an open hold still names it.

Why a lot named by an open hold stays: a release gives its uses back into their slots
(ledger_give_back), so the slot must exist until every hold on it ended. Such a lot is closed
by a later run of the expiry job (accounts/lot_expiry.py), which writes what the holds gave
back as another movement of the same kind. A VOID leaves the held uses to their holds (a hold
is a promise: a capture still takes them) and voids only what is left; the wallet slot's
expiry becomes the void's instant, so uses given back by a release are unusable at once, and
`voided_at` marks the lot for the job.

Safe against the hot path: every statement that creates, captures, releases or expires a hold
changes the account row, so it waits for this transaction's lock: no hold on the account
starts meanwhile. A release that already changed its reservation (locked before the account,
the one lock order) but waits for the account is not committed: the hold reads as open here,
the lot stays, and the next job run closes it. Conservative both ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, any_, exists, literal, select, tuple_, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts, lots, reservations, utcnow
from ciris_billing.ledger.credits import write_credit
from ciris_billing.ledger.rules import KIND_RANK
from ciris_billing.ledger.wallet import Wallet, lock_wallet, store

# The credits kind and the lot's final status, by why it closes.
EXPIRED = "expired"
VOID = "void"
_STATUS = {EXPIRED: "expired", VOID: "voided"}


@dataclass(frozen=True, slots=True)
class Closed:
    """What a close did: the uses it took (what was left), whether the lot left its wallet."""

    lot_id: str
    account_id: str
    kind: str  # the lot's kind
    movement: str  # EXPIRED or VOID: the credits row's kind
    uses: int
    expires_at: datetime | None
    removed: bool
    status: str  # the lot's status afterwards
    account: Row[Any]  # the account row afterwards


@dataclass(frozen=True, slots=True)
class Why:
    """The movement's kind and its ledger fields (a void's reason and key)."""

    kind: str
    description: str | None = None
    api_key_id: str | None = None
    idempotency_key: str | None = None


async def lot_account(conn: AsyncConnection, lot_id: str) -> str | None:
    """The account a lot belongs to (None: no such lot). Read without a lock: a lot never
    changes account, and the caller locks that account before anything else."""
    return await conn.scalar(select(lots.c.account_id).where(lots.c.id == lot_id))


async def _held(conn: AsyncConnection, account_id: str, lot_id: str) -> bool:
    """Does an open hold name the lot? (Read under the account's lock: see the module doc.)"""
    named = exists().where(
        reservations.c.account_id == account_id,
        reservations.c.status == "held",
        literal(lot_id) == any_(reservations.c.lot_ids),
    )
    return bool(await conn.scalar(select(named)))


async def _waiting(conn: AsyncConnection, account_id: str, lot_id: str) -> bool:
    """An expired (or voided) lot with nothing left whose open holds still name it: nothing to
    write until they end, so the job neither locks the account nor writes (read without a
    lock: a hold ending meanwhile is seen by the next run)."""
    row = (
        await conn.execute(
            select(accounts.c.lot_ids, accounts.c.lot_left).where(accounts.c.id == account_id)
        )
    ).one()
    ids = list(row.lot_ids)
    if lot_id not in ids or int(row.lot_left[ids.index(lot_id)]) > 0:
        return False
    return await _held(conn, account_id, lot_id)


async def close_lot(
    conn: AsyncConnection, lot_id: str, why: Why, at: datetime | None = None
) -> Closed | None:
    """Close the lot for `why` (EXPIRED: only once its expires_at has passed, or once it was
    voided; VOID: now), in the caller's transaction. None when it is not open (closed, or not
    due), or does not exist."""
    at = at or utcnow()
    account_id = await lot_account(conn, lot_id)
    if account_id is None:
        return None
    if why.kind == EXPIRED and await _waiting(conn, account_id, lot_id):
        return None
    wallet = await lock_wallet(conn, account_id)
    # Read after the account's lock: a close that committed meanwhile is seen.
    lot = (await conn.execute(select(lots).where(lots.c.id == lot_id).with_for_update())).one()
    if lot.status != "active":
        return None
    voided = lot.voided_at is not None
    if why.kind == VOID and voided:
        return None  # voided already (open holds kept it in its wallet)
    if why.kind == EXPIRED and not voided and (lot.expires_at is None or lot.expires_at > at):
        return None
    kind = VOID if voided else why.kind
    slot = wallet.ids.index(lot_id) if lot_id in wallet.ids else None
    left = 0 if slot is None else int(wallet.left[slot])
    free = left if slot is not None and wallet.kinds[slot] == KIND_RANK["free"] else 0
    if left:
        await write_credit(
            conn,
            account_id=account_id,
            kind=kind,
            currency=lot.currency,
            free=-free,
            paid=-(left - free),
            description=why.description,
            idempotency_key=why.idempotency_key,
            api_key_id=why.api_key_id,
            lot_ids=[lot_id],
            lot_uses=[-left],
        )
    removed = not await _held(conn, account_id, lot_id)
    if slot is not None:
        wallet.left[slot] = 0
        if removed:
            _remove(wallet, slot)
        elif why.kind == VOID:
            wallet.expires[slot] = at  # uses a release gives back are unusable at once
    status = _STATUS[kind] if removed else "active"
    await conn.execute(
        lots.update()
        .where(lots.c.id == lot_id)
        .values(
            status=status,
            closed_at=at if removed else None,
            voided_at=at if why.kind == VOID else lot.voided_at,
        )
    )
    # Removing a slot keeps the others' order: the wallet is written back as it is.
    account = await store(conn, account_id, wallet, -free, -(left - free))
    return Closed(
        lot_id, account_id, lot.kind, kind, left, lot.expires_at, removed, status, account
    )


def _remove(wallet: Wallet, slot: int) -> None:
    for column in (wallet.ids, wallet.left, wallet.kinds, wallet.expires):
        del column[slot]


Due = tuple[datetime, str]


async def due_lots(
    conn: AsyncConnection, at: datetime, limit: int, after: Due | None = None
) -> list[Due]:
    """Open lots the expiry job must close, as (due, lot id), in that order, after `after` (a
    run pages through them: lots still held at their expiry never hide the next ones):
    expired at `at` (ix_lots_open_expires_at), or voided while held (ix_lots_open_voided_at)."""

    def page(due: Any, *where: Any) -> Any:
        query = select(lots.c.id, due.label("due")).where(lots.c.status == "active", *where)
        if after is not None:
            query = query.where(
                tuple_(due, lots.c.id) > tuple_(literal(after[0]), literal(after[1]))
            )
        return query.order_by(due, lots.c.id).limit(limit)

    union = union_all(
        page(lots.c.expires_at, lots.c.expires_at <= at),
        page(lots.c.voided_at, lots.c.voided_at.is_not(None)),
    ).subquery()
    rows = await conn.execute(
        select(union.c.due, union.c.id).distinct().order_by(union.c.due, union.c.id).limit(limit)
    )
    return [(row.due, row.id) for row in rows]
