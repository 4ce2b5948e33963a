"""The cold moves of uses: refunds, dispute holds and closings, adjustments, erasure.

Each move is one `credits` row naming the lots it changed (`lot_ids`, `lot_uses`: SIGNED, +
gives uses to a lot, - takes), the wallet's slots changed by the same amounts, and the
account's counters moved by their sums per kind (free lots: free_uses_remaining, promotional
and paid lots: paid_uses_remaining), all in the caller's transaction under the account row's
lock. The caller takes the locks before: the one lock order is purchase -> reservations (by
id) -> account (lock_wallet takes the account's `FOR UPDATE`; taking it again is a no-op).

The row is written first: its unique `external_transaction_id` (when it has one) is what
makes a provider's event move uses once; when it was recorded already, nothing moves.
Lots left with nothing and named by no open hold leave the wallet (status 'used') on the way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts, lots, reservations, utcnow
from ciris_billing.ledger.credits import write_credit
from ciris_billing.ledger.rules import KIND_RANK
from ciris_billing.ledger.wallet import Wallet, close_spent, lock_wallet, reopen, store

FREE = KIND_RANK["free"]
# The kinds an adjustment takes from: everything but the free uses.
PAID_KINDS = {KIND_RANK["promotional"], KIND_RANK["paid"]}


@dataclass(frozen=True, slots=True)
class Move:
    """One movement's ledger row: what kind, and the account-level parts that are not lots."""

    kind: str
    currency: str
    description: str | None = None
    external_transaction_id: str | None = None
    idempotency_key: str | None = None
    api_key_id: str | None = None
    amount_minor: int = 0
    held: int = 0  # into (+) or out of (-) accounts.held_uses (a dispute's hold)
    shortfall: int = 0
    owed: int = 0  # added to accounts.refund_owed_uses
    # lot id -> signed change of what it has left (the lots this move touched)
    lots: dict[str, int] = field(default_factory=dict)


def left_of(wallet: Wallet, lot_id: str) -> int:
    """What a lot has left in the wallet (0 when it left the wallet)."""
    return wallet.left[wallet.ids.index(lot_id)] if lot_id in wallet.ids else 0


async def apply(
    conn: AsyncConnection,
    account_id: str,
    move: Move,
    *,
    wallet: Wallet | None = None,
    at: datetime | None = None,
    close_as: str = "used",
) -> Any | None:
    """Record `move` and apply it: the credits row, the wallet, the counters. The account's
    row after, or None when its external id was already recorded (nothing moved). `wallet`:
    the caller's, already locked (lock_wallet), else it is locked here."""
    wallet = wallet or await lock_wallet(conn, account_id)
    changes = {lot_id: uses for lot_id, uses in move.lots.items() if uses}
    kinds = dict(zip(wallet.ids, wallet.kinds, strict=True))
    away = [lot_id for lot_id in changes if lot_id not in kinds]
    if away:  # lots that left the wallet (given back to: a dispute won after they closed)
        for row in await conn.execute(select(lots.c.id, lots.c.kind).where(lots.c.id.in_(away))):
            kinds[row.id] = KIND_RANK[row.kind]
    free = sum(uses for lot_id, uses in changes.items() if kinds[lot_id] == FREE)
    paid = sum(changes.values()) - free
    if not await write_credit(
        conn,
        account_id=account_id,
        kind=move.kind,
        currency=move.currency,
        free=free,
        paid=paid,
        held=move.held,
        shortfall=move.shortfall,
        amount_minor=move.amount_minor,
        external_transaction_id=move.external_transaction_id,
        description=move.description,
        idempotency_key=move.idempotency_key,
        api_key_id=move.api_key_id,
        lot_ids=list(changes) or None,
        lot_uses=list(changes.values()) or None,
    ):
        return None
    wallet = Wallet(list(wallet.ids), list(wallet.left), list(wallet.kinds), list(wallet.expires))
    for lot_id, uses in changes.items():
        if lot_id not in wallet.ids:
            if uses < 0:
                raise ValueError(f"lot {lot_id} is not in the wallet of {account_id}")
            wallet = await reopen(conn, wallet, lot_id)
        # The CHECK (0 <= ALL (lot_left)) refuses any lot going below 0.
        wallet.left[wallet.ids.index(lot_id)] += uses
    wallet = await close_spent(conn, account_id, wallet, status=close_as, only=set(changes), at=at)
    extra: dict[str, Any] = {}
    if move.held:
        extra["held_uses"] = accounts.c.held_uses + move.held
    if move.owed:
        extra["refund_owed_uses"] = accounts.c.refund_owed_uses + move.owed
    return await store(conn, account_id, wallet, free, paid, **extra)


async def purchase_lot(conn: AsyncConnection, purchase_id: str) -> str | None:
    """The paid lot a purchase was credited as (one per purchase: a unique index)."""
    found: str | None = await conn.scalar(
        select(lots.c.id).where(lots.c.purchase_id == purchase_id)
    )
    return found


async def held_of_lot(
    conn: AsyncConnection, account_id: str, lot_id: str, *, lock: bool = False
) -> list[tuple[str, int]]:
    """The open holds that hold uses of `lot_id`, by id, with how many: (reservation id,
    uses). `lock`: FOR UPDATE, in id order (the lock order's reservations, before the
    account)."""
    position = func.array_position(reservations.c.lot_ids, lot_id)
    query = (
        select(reservations.c.id, reservations.c.lot_uses[position].label("uses"))
        .where(
            reservations.c.account_id == account_id,
            reservations.c.status == "held",
            position.is_not(None),
        )
        .order_by(reservations.c.id)
    )
    if lock:
        query = query.with_for_update()
    return [(row.id, int(row.uses or 0)) for row in await conn.execute(query)]


async def take_in_order(
    conn: AsyncConnection, account_id: str, uses: int, kinds: set[int], at: datetime
) -> tuple[Wallet, dict[str, int]] | None:
    """The locked wallet and the take of `uses` from its lots of `kinds`, in the consumption
    order (the wallet's), skipping lots expired at `at`; None when they hold fewer."""
    wallet = await lock_wallet(conn, account_id)
    take: dict[str, int] = {}
    need = uses
    for lot_id, left, kind, expires in zip(
        wallet.ids, wallet.left, wallet.kinds, wallet.expires, strict=True
    ):
        if need <= 0:
            break
        if kind not in kinds or left <= 0 or (expires is not None and expires <= at):
            continue
        part = min(left, need)
        take[lot_id] = -part
        need -= part
    return (wallet, take) if need <= 0 else None


async def erase_wallet(conn: AsyncConnection, account_id: str, currency: str) -> Any:
    """An erased account's uses written off: one `void` row taking what every lot has left,
    the counters to 0, and its lots out of the wallet (status 'erased'), but those an open
    hold names: a hold is a promise (it can still be captured, or released back into them)."""
    at = utcnow()
    wallet = await lock_wallet(conn, account_id)
    changes = {lot_id: -left for lot_id, left in zip(wallet.ids, wallet.left, strict=True) if left}
    if changes:
        await apply(
            conn,
            account_id,
            Move(kind="void", currency=currency, description=ERASED, lots=changes),
            wallet=wallet,
            at=at,
            close_as="erased",
        )
        wallet = await lock_wallet(conn, account_id)
    # Lots already empty, named by no open hold, leave too.
    wallet = await close_spent(conn, account_id, wallet, status="erased", at=at)
    return await store(conn, account_id, wallet, 0, 0)


ERASED = "Written off: account erased"
