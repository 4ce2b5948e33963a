"""Lots in and out of an account's wallet: the cold half of the money core.

Whoever adds a lot (a grant, a purchase credited, the free uses) or removes one (used up,
expired, voided) goes through here, under the account row's lock (`FOR UPDATE`, taken first:
the one lock order is purchase -> reservations (by id) -> account). The wallet is written back
in the consumption order (rules.consumption_key) with the counters and next_expiry_at it
implies, in the caller's transaction (its one unit of work).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts, lots, new_id, reservations, utcnow
from ciris_billing.ledger.credits import write_credit
from ciris_billing.ledger.rules import DEFAULT_PRIORITY, KIND_RANK, LotKind, consumption_key


@dataclass(frozen=True, slots=True)
class NewLot:
    """A grant of uses as a lot: what, how many, and when it stops counting."""

    kind: LotKind
    uses: int
    source: str
    priority: int = DEFAULT_PRIORITY
    expires_at: datetime | None = None
    amount_minor: int = 0  # what was paid for the whole lot (paid lots only)
    purchase_id: str | None = None
    pack_id: str | None = None  # the catalog's pack a purchase's lot came from


@dataclass(frozen=True, slots=True)
class Credit:
    """The ledger row that records the grant (credits.py write_credit's fields)."""

    kind: str
    currency: str
    description: str | None = None
    external_transaction_id: str | None = None
    idempotency_key: str | None = None
    api_key_id: str | None = None
    amount_minor: int = 0


@dataclass(slots=True)
class Wallet:
    """An account's open lots in consumption order, as its row holds them (locked)."""

    ids: list[str]
    left: list[int]
    kinds: list[int]
    expires: list[datetime | None]

    def next_expiry(self) -> datetime | None:
        dated = [when for when in self.expires if when is not None]
        return min(dated) if dated else None


async def lock_wallet(conn: AsyncConnection, account_id: str) -> Wallet:
    """The account's wallet, its row locked until the transaction ends."""
    row = (
        await conn.execute(
            select(
                accounts.c.lot_ids,
                accounts.c.lot_left,
                accounts.c.lot_kinds,
                accounts.c.lot_expires,
            )
            .where(accounts.c.id == account_id)
            .with_for_update()
        )
    ).one()
    return Wallet(list(row.lot_ids), list(row.lot_left), list(row.lot_kinds), list(row.lot_expires))


async def _ordered(conn: AsyncConnection, wallet: Wallet) -> Wallet:
    """The wallet sorted by the consumption rule (its lots' priority, expiry, kind, age)."""
    if not wallet.ids:
        return wallet
    found = {
        r.id: r
        for r in await conn.execute(
            select(
                lots.c.id, lots.c.priority, lots.c.expires_at, lots.c.kind, lots.c.created_at
            ).where(lots.c.id.in_(wallet.ids))
        )
    }
    order = sorted(
        range(len(wallet.ids)),
        key=lambda i: consumption_key(
            found[wallet.ids[i]].priority,
            found[wallet.ids[i]].expires_at,
            found[wallet.ids[i]].kind,
            found[wallet.ids[i]].created_at,
            wallet.ids[i],
        ),
    )
    return Wallet(
        [wallet.ids[i] for i in order],
        [wallet.left[i] for i in order],
        [wallet.kinds[i] for i in order],
        [wallet.expires[i] for i in order],
    )


async def store(
    conn: AsyncConnection,
    account_id: str,
    wallet: Wallet,
    free_delta: int,
    paid_delta: int,
    **values: Any,
) -> Any:
    """Write the (locked) wallet back with next_expiry_at, the counters moved by the deltas and
    any other `values` (held_uses, refund_owed_uses...); the account row after."""
    return (
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(
                lot_ids=wallet.ids,
                lot_left=wallet.left,
                lot_kinds=wallet.kinds,
                lot_expires=wallet.expires,
                next_expiry_at=wallet.next_expiry(),
                free_uses_remaining=accounts.c.free_uses_remaining + free_delta,
                paid_uses_remaining=accounts.c.paid_uses_remaining + paid_delta,
                updated_at=utcnow(),
                **values,
            )
            .returning(*accounts.c)
        )
    ).one()


async def reopen(conn: AsyncConnection, wallet: Wallet, lot_id: str) -> Wallet:
    """The wallet with `lot_id` back in it (left 0), in order, its status 'active' again: uses
    are given back to a lot that had left the wallet (a dispute won, after its lot was used
    up and closed). The caller holds the account's lock (lock_wallet)."""
    if lot_id in wallet.ids:
        return wallet
    lot = (
        await conn.execute(
            lots.update()
            .where(lots.c.id == lot_id)
            .values(status="active", closed_at=None)
            .returning(lots.c.kind, lots.c.expires_at)
        )
    ).one()
    wallet.ids.append(lot_id)
    wallet.left.append(0)
    wallet.kinds.append(KIND_RANK[lot.kind])
    wallet.expires.append(lot.expires_at)
    return await _ordered(conn, wallet)


async def held_lot_ids(conn: AsyncConnection, account_id: str) -> set[str]:
    """The lots the account's open ('held') reservations name: they stay in the wallet."""
    rows = await conn.execute(
        select(func.unnest(reservations.c.lot_ids).label("lot_id")).where(
            reservations.c.account_id == account_id, reservations.c.status == "held"
        )
    )
    return {row.lot_id for row in rows}


async def close_spent(
    conn: AsyncConnection,
    account_id: str,
    wallet: Wallet,
    *,
    status: str = "used",
    only: set[str] | None = None,
    at: datetime | None = None,
) -> Wallet:
    """The wallet without its lots that have nothing left and that no open hold names (or
    only those of `only`), each closed with `status` (used, erased...): keeps the wallet's
    arrays short. Cold moves only, never the hot path. Safe: the caller holds the account's
    row lock, and a hold takes uses only by updating that row (it waits for us, then walks
    the wallet as we leave it); a hold read open here that is ending meanwhile merely keeps
    its lots in the wallet until the next cold move."""
    empty = [
        lot_id
        for lot_id, left in zip(wallet.ids, wallet.left, strict=True)
        if left == 0 and (only is None or lot_id in only)
    ]
    if not empty:
        return wallet
    named = await held_lot_ids(conn, account_id)
    closing = [lot_id for lot_id in empty if lot_id not in named]
    if not closing:
        return wallet
    await conn.execute(
        lots.update()
        .where(lots.c.id.in_(closing), lots.c.status == "active")
        .values(status=status, closed_at=at or utcnow())
    )
    keep = [i for i, lot_id in enumerate(wallet.ids) if lot_id not in closing]
    return Wallet(
        [wallet.ids[i] for i in keep],
        [wallet.left[i] for i in keep],
        [wallet.kinds[i] for i in keep],
        [wallet.expires[i] for i in keep],
    )


async def add_lot(
    conn: AsyncConnection, account_id: str, lot: NewLot, credit: Credit, at: datetime | None = None
) -> str | None:
    """Grant `lot` to the account: the credits row, the lot, the wallet and the counters, in the
    caller's transaction. None (and nothing done) when the credit's external_transaction_id was
    already recorded: that unique id is what makes a payment credit once."""
    at = at or utcnow()
    wallet = await lock_wallet(conn, account_id)
    credit_id = new_id("cr")
    free = lot.uses if lot.kind == "free" else 0
    if not await write_credit(
        conn,
        account_id=account_id,
        kind=credit.kind,
        currency=credit.currency,
        free=free,
        paid=lot.uses - free,
        amount_minor=credit.amount_minor,
        external_transaction_id=credit.external_transaction_id,
        description=credit.description,
        idempotency_key=credit.idempotency_key,
        api_key_id=credit.api_key_id,
        credit_id=credit_id,
    ):
        return None
    lot_id = new_id("lot")
    await conn.execute(
        lots.insert().values(
            id=lot_id,
            account_id=account_id,
            kind=lot.kind,
            source=lot.source,
            priority=lot.priority,
            expires_at=lot.expires_at,
            uses_granted=lot.uses,
            amount_minor=lot.amount_minor,
            currency=credit.currency,
            cost_basis_minor=lot.amount_minor // lot.uses
            if lot.kind == "paid" and lot.uses
            else None,
            purchase_id=lot.purchase_id,
            pack_id=lot.pack_id,
            credit_id=credit_id,
            status="active",
            created_at=at,
        )
    )
    # Lots used up and named by no open hold leave the wallet here too (arrays stay short).
    wallet = await close_spent(conn, account_id, wallet, at=at)
    wallet.ids.append(lot_id)
    wallet.left.append(lot.uses)
    wallet.kinds.append(KIND_RANK[lot.kind])
    wallet.expires.append(lot.expires_at)
    await store(conn, account_id, await _ordered(conn, wallet), free, lot.uses - free)
    return lot_id


__all__ = [
    "Credit",
    "NewLot",
    "Wallet",
    "add_lot",
    "close_spent",
    "held_lot_ids",
    "lock_wallet",
    "reopen",
    "store",
]
