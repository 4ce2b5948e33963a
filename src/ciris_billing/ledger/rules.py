"""The consumption rule, defined once: which lot a use comes from.

Order: priority (lower first), then the soonest `expires_at` (never-expiring lots last), then
kind (free, promotional, paid), then the oldest, then the lot id (a total order). With today's
defaults (nothing expires, one priority) that is the guide's "free uses first, then paid".

Two halves, one definition:
- `consumption_key` orders an account's lots; whoever adds a lot to an account (or removes one)
  writes the account's wallet (`lot_ids`, `lot_left`, `lot_kinds`, `lot_expires`) back in this
  order, under the account row's lock (ledger/wallet.py);
- the walk (`ledger_walk`, ledger/functions.py) takes uses from the wallet in its order,
  skipping lots expired at the statement's time. The hot statements (charge, hold and their
  batched twins) render their WHERE and SET clauses from `can_take` and `walk_assignment`
  below, so every one of them applies the same rule; tests/ledger/test_rules.py renders them
  and checks.

An expired lot is unusable at its instant: the walk skips it and `can_take` counts it out,
whether or not the expiry job has written its `expired` movement yet. The counters on the
account row (free_uses_remaining, paid_uses_remaining) include expired lots until that job
runs; `next_expiry_at` (the soonest expiry in the wallet) says when they may start to lie, so
before it the counters answer (one indexed read, no function call) and past it
`ledger_available` does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

LotKind = Literal["free", "promotional", "paid"]
LOT_KINDS: tuple[LotKind, ...] = ("free", "promotional", "paid")
# The wallet's lot_kinds codes: the kind's rank in the consumption order.
KIND_RANK: dict[str, int] = {kind: rank for rank, kind in enumerate(LOT_KINDS)}
DEFAULT_PRIORITY = 100
_NEVER = datetime.max.replace(tzinfo=None)


def consumption_key(
    priority: int, expires_at: datetime | None, kind: str, created_at: datetime, lot_id: str
) -> tuple[int, bool, datetime, int, datetime, str]:
    """The sort key of a lot in the consumption order (ascending = consumed first)."""
    expiry = _NEVER if expires_at is None else expires_at.replace(tzinfo=None)
    return (
        priority,
        expires_at is None,
        expiry,
        KIND_RANK[kind],
        created_at.replace(tzinfo=None),
        lot_id,
    )


def can_take(row: str, uses: str, at: str) -> str:
    """SQL (a WHERE condition): the account row `row` (an alias with its dot, or "") can give
    `uses` at `at`. Before next_expiry_at nothing in the wallet has expired, so the counters
    say it; past it, the lots usable at `at` do."""
    return f"""(CASE WHEN {row}next_expiry_at IS NULL OR {row}next_expiry_at > {at}
            THEN {row}free_uses_remaining + {row}paid_uses_remaining
            ELSE ledger_available({row}lot_left, {row}lot_expires, {at}) END) >= {uses}"""


def walk_assignment(row: str, uses: str, at: str, *, hold: bool = False) -> str:
    """SQL (one SET item): the walk applied to the locked account row `row`: its wallet after
    taking `uses` at `at`, the per-slot take kept in `last_lot_uses` (the movement row reads it
    from RETURNING: SET sees the old row, RETURNING the new), how many were free kept in
    `last_charge_free_uses`, and the counters. Guarded by `can_take` in the same WHERE. A
    `hold` also moves the taken uses into the reserved counters, by kind."""
    reserved = (
        f""",
            {row}reserved_free_uses + w.free_taken, {row}reserved_paid_uses + w.other_taken"""
        if hold
        else ""
    )
    columns = ", reserved_free_uses, reserved_paid_uses" if hold else ""
    return f"""(lot_left, last_lot_uses, last_charge_free_uses, free_uses_remaining,
         paid_uses_remaining{columns}) = (
            SELECT w.new_left, w.taken, w.free_taken,
                   {row}free_uses_remaining - w.free_taken,
                   {row}paid_uses_remaining - w.other_taken{reserved}
            FROM ledger_walk({row}lot_left, {row}lot_kinds, {row}lot_expires,
                             {uses}, {at}) w)"""  # noqa: S608 (our own constants)


def free_period_current(row: str, at: str) -> str:
    """SQL (a WHERE condition, FREE_USES_RESET=monthly only): the account's free period is the
    calendar month (UTC) of `at`, so its month's free lot is in the wallet. When it is not, the
    statement makes nothing and the slow path adds the lot (ledger/free_periods.py)."""
    return f"{row}free_period = date_trunc('month', {at}, 'UTC')"


def touched_lots(row: str) -> str:
    """SQL (three select items): the lots a movement touched, their kinds and the uses it took
    from each, from a RETURNING row of a statement that applied `walk_assignment`."""
    return (
        f"ledger_touched({row}lot_ids, {row}last_lot_uses) AS lot_ids, "
        f"ledger_touched({row}lot_kinds, {row}last_lot_uses) AS lot_kinds, "
        f"array_remove({row}last_lot_uses, 0::bigint) AS lot_uses"
    )
