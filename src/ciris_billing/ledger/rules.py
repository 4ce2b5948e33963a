"""The consumption rule, defined once: which lot a use comes from.

Order: priority (lower first), then the soonest `expires_at` (never-expiring lots last), then
kind (free, promotional, paid), then the oldest, then the lot id (a total order). With today's
defaults (nothing expires, one priority) that is the guide's "free uses first, then paid".

Two halves, one definition:
- `consumption_key` orders an account's lots; whoever adds a lot to an account (or removes one)
  writes the account's wallet (`lot_ids`, `lot_left`, `lot_kinds`, `lot_expires`) back in this
  order, under the account row's lock (ledger/wallet.py);
- the walk (`ledger_take`, ledger/functions.py) takes uses from the wallet in its order,
  skipping lots expired at the statement's time. The hot statements (charge, hold and their
  batched twins) render their WHERE and SET clauses from `can_take` and `walk_assignment`
  below, so every one of them applies the same rule; tests/ledger/test_rules.py renders them
  and checks. A charge first tries the walk's common case in plain SQL (`head_covers`,
  `head_assignment`: the first lot with uses left gives them all), and only when that makes
  no row sends the walk.

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
    """SQL (one SET item): the walk (`ledger_take`) applied to the locked account row `row`: its
    wallet after taking `uses` at `at`, the lots it touched with their kinds and the uses taken
    from each kept in `last_lot_ids`, `last_lot_kinds`, `last_lot_uses` (the movement row reads
    them from RETURNING: SET sees the old row, RETURNING the new), how many were free kept in
    `last_charge_free_uses`, and the counters. Guarded by `can_take` in the same WHERE. A
    `hold` also moves the taken uses into the reserved counters, by kind."""
    reserved = (
        f""",
            {row}reserved_free_uses + w.free_taken, {row}reserved_paid_uses + w.other_taken"""
        if hold
        else ""
    )
    columns = ", reserved_free_uses, reserved_paid_uses" if hold else ""
    return f"""(lot_left, last_lot_ids, last_lot_kinds, last_lot_uses, last_charge_free_uses,
         free_uses_remaining, paid_uses_remaining{columns}) = (
            SELECT w.new_left, w.ids, w.kinds, w.taken, w.free_taken,
                   {row}free_uses_remaining - w.free_taken,
                   {row}paid_uses_remaining - w.other_taken{reserved}
            FROM ledger_take({row}lot_ids, {row}lot_left, {row}lot_kinds, {row}lot_expires,
                             {uses}, {at}) w)"""  # noqa: S608 (our own constants)


def head_slot(row: str) -> str:
    """SQL: the wallet slot of its first lot with uses left when that is one of the first three
    (a used-up lot stays in the wallet until the next cold move closes it: the free uses, a
    promotional grant used up before a purchase). Past three used-up lots the head text makes
    no row and the walk's text serves, until a cold move (a grant, a purchase) closes them."""
    return f"(CASE WHEN {row}lot_left[1] > 0 THEN 1 WHEN {row}lot_left[2] > 0 THEN 2 ELSE 3 END)"


def head_covers(row: str, uses: str, at: str) -> str:
    """SQL (a WHERE condition): the head lot (`head_slot`) is usable at `at` and has `uses`.
    Then the walk takes them all from it, in plain SQL (`head_assignment`): no function call.
    When not (the uses span lots, the head expired, or there are not enough), the statement
    makes no row and the caller sends the walk's statement (`walk_assignment`): the same rule,
    tests/ledger/test_rules.py checks both over random wallets."""
    k = head_slot(row)
    return (
        f"{row}lot_left[{k}] >= {uses} "
        f"AND ({row}lot_expires[{k}] IS NULL OR {row}lot_expires[{k}] > {at})"
    )


def head_assignment(row: str, uses: str, *, hold: bool = False, maybe_none: bool = False) -> str:
    """SQL (SET items): the walk's outcome when the head lot gives all `uses` (`head_covers`
    holds): its slot lowered, the movement's lots and the counters, as `walk_assignment`'s
    (a `hold` also into the reserved counters, by kind). `maybe_none`: `uses` may be 0 (a
    `carry` charge completing no use, ledger/carry.py; its WHERE is `uses = 0 OR head_covers`):
    then the wallet is left as it is (the head slot may not even exist: assigning past an
    array's end would extend it) and the movement names no lot."""
    k = head_slot(row)
    free = f"CASE WHEN {row}lot_kinds[{k}] = 0 THEN {uses} ELSE 0 END"
    reserved = (
        f""",
        reserved_free_uses = {row}reserved_free_uses + {free},
        reserved_paid_uses = {row}reserved_paid_uses + ({uses} - {free})"""
        if hold
        else ""
    )
    lowered = f"lot_left[{k}] = {row}lot_left[{k}] - {uses}"
    lots = [f"ARRAY[{row}lot_ids[{k}]]", f"ARRAY[{row}lot_kinds[{k}]]", f"ARRAY[{uses}]"]
    if maybe_none:
        left = f"{row}lot_left"
        lowered = (
            f"lot_left = CASE WHEN {uses} = 0 THEN {left} ELSE {left}[:{k} - 1]"
            f" || ({left}[{k}] - {uses}) || {left}[{k} + 1:] END"
        )
        lots = [f"CASE WHEN {uses} = 0 THEN '{{}}' ELSE {lot} END" for lot in lots]
    return f"""{lowered},
        last_lot_ids = {lots[0]},
        last_lot_kinds = {lots[1]},
        last_lot_uses = {lots[2]},
        last_charge_free_uses = {free},
        free_uses_remaining = {row}free_uses_remaining - {free},
        paid_uses_remaining = {row}paid_uses_remaining - ({uses} - {free}){reserved}"""


def free_period_current(row: str, at: str, *, everyone: bool = True) -> str:
    """SQL (a WHERE condition): the account's free period is the calendar month (UTC) of `at`,
    so its month's free lot is in the wallet. When it is not, the statement makes nothing and
    the slow path adds the lot (ledger/free_periods.py). With FREE_USES_RESET=monthly
    (`everyone`) every account has a period; otherwise only accounts on a monthly plan
    (catalog) have one, and an account without one (NULL) never renews."""
    current = f"{row}free_period = date_trunc('month', {at}, 'UTC')"
    return current if everyone else f"({row}free_period IS NULL OR {current})"


def touched_lots(row: str) -> str:
    """SQL (three select items): the lots a movement touched, their kinds and the uses it took
    from each, from a RETURNING row of a statement that applied `walk_assignment` or
    `head_assignment`."""
    return (
        f"{row}last_lot_ids AS lot_ids, {row}last_lot_kinds AS lot_kinds, "
        f"{row}last_lot_uses AS lot_uses"
    )
