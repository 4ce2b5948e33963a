"""What an account can give at an instant, read from its row (the Python twin of
`ledger_available`, ledger/functions.py): its counters before `next_expiry_at` (nothing in its
wallet has expired yet: one indexed read answers), past it what its unexpired lots hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class Usable:
    """Uses an account can give at an instant: free, the others (promotional + paid), and the
    soonest-expiring lot(s) with uses left (their uses, when; None: nothing expires)."""

    free: int
    other: int
    next_expiry_uses: int = 0
    next_expiry_at: datetime | None = None

    @property
    def total(self) -> int:
        return self.free + self.other


def usable_in(
    left: Sequence[int], kinds: Sequence[int], expires: Sequence[datetime | None], at: datetime
) -> Usable:
    """What a wallet's lots can give at `at` (lots expired at `at` give none)."""
    free = other = 0
    soonest: datetime | None = None
    soonest_uses = 0
    for uses, kind, when in zip(left, kinds, expires, strict=True):
        if uses <= 0 or (when is not None and when <= at):
            continue
        if kind == 0:
            free += int(uses)
        else:
            other += int(uses)
        if when is not None:
            if soonest is None or when < soonest:
                soonest, soonest_uses = when, int(uses)
            elif when == soonest:
                soonest_uses += int(uses)
    return Usable(free, other, soonest_uses, soonest)


def usable(account: Mapping[str, Any] | Any, at: datetime) -> Usable:
    """What the account (a row's mapping or a record with the counters, `next_expiry_at` and,
    when that is set, the wallet's lot_left, lot_kinds, lot_expires) can give at `at`."""
    row = account._mapping if hasattr(account, "_mapping") else account
    if row["next_expiry_at"] is None:
        return Usable(int(row["free_uses_remaining"]), int(row["paid_uses_remaining"]))
    return usable_in(row["lot_left"], row["lot_kinds"], row["lot_expires"], at)


def with_usable(account: Mapping[str, Any] | Any, at: datetime) -> dict[str, Any]:
    """The account's mapping with its free/paid counters replaced by what it can give at `at`
    (what an answer reports as available)."""
    row = account._mapping if hasattr(account, "_mapping") else account
    now = usable(row, at)
    return {**dict(row), "free_uses_remaining": now.free, "paid_uses_remaining": now.other}
