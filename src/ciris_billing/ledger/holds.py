"""Holds on the framework's path (accounts/reservations.py): taken, spent and given back here.

The hot path's hold and capture are statements (statements.py, capture_statements.py); these
are their cold twins, in the caller's transaction (its one unit of work), plus what only the
cold path does: a hold given back on release or on expiry (the job), and the capture of a hold
that owes uses to a dispute.

- `take`: the hot hold's UPDATE (the walk, guarded by can_take) for one account;
- `consume`: a capture's walk over the hold's lots, in the hold's order, with no expiry check
  (a hold is a promise): the Python twin of `ledger_walk(r.lot_uses, r.lot_kinds, NULL, c, at)`
  (tests/ledger/test_rules.py compares them);
- `end_holds`: holds that end give their uses back, each to the lot it came from
  (`ledger_give_back`), after paying off the account's owed uses from their non-free lots (the
  `owed_taken` ledger row names those lots) and the uses owed to open disputes
  (payments/disputes.py hold_owed_uses), with the counters, reserved counters by kind and
  total uses (a capture's spent uses) in one UPDATE of the locked account row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, bindparam, func, select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import LotIds, LotUses, accounts, charges
from ciris_billing.ledger.credits import write_credit
from ciris_billing.ledger.rules import can_take, touched_lots, walk_assignment

# payments/disputes.py hold_owed_uses: (conn, account id, {hold id: (row, paid uses back)},
# paid uses back after owed ones, why) -> the uses moved into open disputes' holds (from the
# disputes' purchase lots, through the money core), after the holds gave their uses back.
OwedToDisputes = Callable[
    [AsyncConnection, str, dict[str, tuple[Row[Any], int]], int, str], Awaitable[int]
]
_USES, _AT = "CAST(:uses AS bigint)", "CAST(:at AS timestamptz)"
# The hot hold's walk for one account, by id: the lots it took, or no row when the account
# cannot give `uses` at `at` (the caller has its row locked and says why).
TAKE_SQL = f"""
UPDATE accounts a SET {walk_assignment("a.", _USES, _AT, hold=True)}, updated_at = {_AT}
WHERE a.id = :account_id AND {can_take("a.", _USES, _AT)}
RETURNING a.last_charge_free_uses AS free_taken, {touched_lots("a.")}
"""  # noqa: S608 (our own constants)


@dataclass(frozen=True, slots=True)
class Taken:
    """What a walk took: how many were free, and from which lots (their kinds, uses each)."""

    free: int
    lot_ids: list[str]
    lot_kinds: list[int]
    lot_uses: list[int]


async def take(conn: AsyncConnection, account_id: str, uses: int, at: datetime) -> Taken | None:
    """Hold `uses` of the account (its row locked by the caller) by the consumption rule: out of
    its lots into its reserved counters, by kind. None when it cannot give them at `at`."""
    row = (
        await conn.execute(text(TAKE_SQL), {"account_id": account_id, "uses": uses, "at": at})
    ).first()
    if row is None:
        return None
    return Taken(int(row.free_taken), list(row.lot_ids), list(row.lot_kinds), list(row.lot_uses))


def consume(lot_uses: Sequence[int], uses: int) -> tuple[list[int], list[int]]:
    """(taken, left) per slot: `uses` taken from the slots in order (no expiry: a hold's lots),
    as ledger_walk does with p_expires NULL."""
    taken, left, need = [], [], uses
    for held in lot_uses:
        part = min(int(held), max(need, 0))
        taken.append(part)
        left.append(int(held) - part)
        need -= part
    if need > 0:
        raise ValueError(f"the hold has {sum(lot_uses)} uses, not {uses}")
    return taken, left


@dataclass(frozen=True, slots=True)
class Ending:
    """A hold that ends (its reservation row: lot_ids, lot_kinds, free/paid_uses_held, owed
    uses) and the uses of each of its lots that come back (all of them on release)."""

    row: Row[Any]
    back: list[int]

    @property
    def paid_back(self) -> int:
        return sum(u for u, kind in zip(self.back, self.row.lot_kinds, strict=True) if kind != 0)


def owed_after(owed: int, paid_back: int, reserved_paid_after: int) -> tuple[int, int]:
    """(uses paid off, uses still owed) when holds give `paid_back` paid uses back and leave
    `reserved_paid_after` reserved: owed uses are paid off first, and no more stays owed than
    is still held (a captured hold's uses were spent: plain shortfall). The hot capture
    statement (capture_statements.py) computes the same in SQL."""
    paid_off = min(owed, paid_back)
    return paid_off, min(owed - paid_off, reserved_paid_after)


def _take_paid(ending: list[Ending], back: list[list[int]], uses: int) -> list[tuple[str, int]]:
    """Take `uses` from the non-free uses coming back, in the holds' order (lot, uses) each;
    `back` (per hold, per slot) is decreased by what was taken."""
    took: list[tuple[str, int]] = []
    for hold, slots in zip(ending, back, strict=True):
        for slot, (lot_id, kind) in enumerate(
            zip(hold.row.lot_ids, hold.row.lot_kinds, strict=True)
        ):
            if uses <= 0:
                return took
            part = min(slots[slot], uses) if kind != 0 else 0
            if part:
                slots[slot] -= part
                uses -= part
                took.append((lot_id, part))
    return took


async def end_holds(
    conn: AsyncConnection,
    account_id: str,
    ending: list[Ending],
    *,
    now: datetime,
    why: str,
    spent: int = 0,
    to_disputes: OwedToDisputes | None = None,
) -> Row[Any]:
    """Holds end (their reservation rows already moved from 'held', so each ends once): their
    reserved uses leave the reserved counters, `spent` of them were charged (total uses),
    the rest comes back to the lots they came from, after paying off owed uses (a refund's or
    a lost dispute's: `owed_taken`, naming its lots) and the uses owed to open disputes
    (`to_disputes`: payments/disputes.py hold_owed_uses, passed by the caller so the core
    imports no business module). The account's row after it."""
    free_held = sum(int(h.row.free_uses_held) for h in ending)
    paid_held = sum(int(h.row.paid_uses_held) for h in ending)
    paid_back = sum(h.paid_back for h in ending)
    back = [list(h.back) for h in ending]
    # Safe: the account's row stays locked until the transaction ends, so the owed uses read
    # here are the ones the UPDATE below settles (lock order: the reservations' rows, already
    # locked by the caller's UPDATE, then the account's).
    locked = (
        await conn.execute(
            select(accounts.c.refund_owed_uses, accounts.c.reserved_paid_uses, accounts.c.currency)
            .where(accounts.c.id == account_id)
            .with_for_update()
        )
    ).one()
    paid_off, owed = 0, None
    if int(locked.refund_owed_uses):
        paid_off, owed = owed_after(
            int(locked.refund_owed_uses), paid_back, int(locked.reserved_paid_uses) - paid_held
        )
    repaid = _take_paid(ending, back, paid_off)
    ids = [lot for h in ending for lot in h.row.lot_ids]
    uses = [u for slots in back for u in slots]
    free_back = sum(
        u
        for h, slots in zip(ending, back, strict=True)
        for u, kind in zip(slots, h.row.lot_kinds, strict=True)
        if kind == 0
    )
    values: dict[str, Any] = {
        "lot_left": func.ledger_give_back(
            accounts.c.lot_ids,
            accounts.c.lot_left,
            bindparam("give_ids", ids, type_=LotIds),
            bindparam("give_uses", uses, type_=LotUses),
            type_=LotUses,
        ),
        "reserved_free_uses": accounts.c.reserved_free_uses - free_held,
        "reserved_paid_uses": accounts.c.reserved_paid_uses - paid_held,
        "free_uses_remaining": accounts.c.free_uses_remaining + free_back,
        "paid_uses_remaining": accounts.c.paid_uses_remaining + sum(uses) - free_back,
        "total_uses": accounts.c.total_uses + spent,
        "updated_at": now,
    }
    if owed is not None:
        values["refund_owed_uses"] = owed
    account = (
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(**values)
            .returning(*accounts.c)
        )
    ).one()
    if paid_off:
        await write_credit(
            conn,
            account_id=account_id,
            kind="owed_taken",
            currency=account.currency,
            paid=-paid_off,
            description=f"{paid_off} paid uses owed to a refund or a lost dispute, taken when "
            f"held uses came back ({why})"[:500],
            lot_ids=[lot for lot, _ in repaid],
            lot_uses=[-part for _, part in repaid],
        )
    if to_disputes is not None and any(int(h.row.owed_uses) for h in ending):
        # Given back above: the uses the ending holds owed an open dispute now go into its
        # hold from the dispute's purchase lot, through the money core (counters included).
        # Safe: the account's row is locked (above), and a dispute closes only under that lock
        # too (disputes._close), so a dispute read open here is open until this ends.
        owing = {h.row.id: (h.row, h.paid_back) for h in ending}
        if await to_disputes(conn, account_id, owing, paid_back - paid_off, why):
            account = (
                await conn.execute(select(accounts).where(accounts.c.id == account_id))
            ).one()
    return account


async def write_capture(
    conn: AsyncConnection,
    won: Row[Any],
    account: Row[Any],
    taken: list[int],
    *,
    charge_id: str,
    free_used: int,
    amount_minor: int,
    description: str | None,
    metadata: dict[str, Any],
    api_key_id: str,
    at: datetime,
    feature: str | None = None,
    quantity: int | None = None,
) -> Row[Any]:
    """The charge row of a captured hold (`won`), naming the lots it spent (`taken` per slot of
    the hold), with the account's counters after it (a `carry` hold's: its feature and the
    quantity captured)."""
    uses = sum(taken)
    return (
        await conn.execute(
            charges.insert()
            .values(
                id=charge_id,
                account_id=account.id,
                uses=uses,
                free_uses_used=free_used,
                paid_uses_used=uses - free_used,
                amount_minor=amount_minor,
                currency=account.currency,
                description=description,
                metadata=metadata,
                api_key_id=api_key_id,
                reservation_id=won.id,
                free_uses_after=account.free_uses_remaining,
                paid_uses_after=account.paid_uses_remaining,
                total_uses_after=account.total_uses,
                lot_ids=[lot for lot, t in zip(won.lot_ids, taken, strict=True) if t],
                lot_uses=[t for t in taken if t],
                feature=feature,
                quantity=quantity,
                created_at=at,
            )
            .returning(*charges.c)
        )
    ).one()
