"""Rates: read and set them (each change an audit row), and what a quantity costs.

A rate says how many units of a feature make one use and how a request's quantity is rounded:
`up` (each request by itself: ceil(quantity / units_per_use)) or `carry` (the account keeps
the remainder per feature, on its row: ledger/carry.py). Setting a feature's rate again
replaces it (POST is an upsert); a change applies to charges from the next refresh of each
process's rate book (book.py, RATES_REFRESH_SECONDS, default 5 s; at once in the process that
made it). A `carry` remainder is kept in units, so a changed units_per_use applies to it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import audit_trail
from ciris_billing.audit_trail import Entry, Operator
from ciris_billing.db import iso, rates, utcnow

Rounding = Literal["up", "carry"]


@dataclass(frozen=True, slots=True)
class Rate:
    feature: str
    units_per_use: int
    rounding: Rounding

    def uses_for(self, quantity: int) -> int:
        """The uses an `up` request of `quantity` takes (rounded up)."""
        return -(-quantity // self.units_per_use)

    def as_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "units_per_use": self.units_per_use,
            "rounding": self.rounding,
        }


def _rate(row: Any) -> Rate:
    return Rate(row.feature, int(row.units_per_use), row.rounding)


async def all_rates(conn: AsyncConnection) -> list[Any]:
    """Every rate row (feature order)."""
    return list(await conn.execute(select(rates).order_by(rates.c.feature)))


async def load(conn: AsyncConnection) -> dict[str, Rate]:
    return {row.feature: _rate(row) for row in await all_rates(conn)}


def rate_out(row: Any) -> dict[str, Any]:
    return {
        **_rate(row).as_dict(),
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


async def set_rate(
    conn: AsyncConnection, operator: Operator, rate: Rate, request_id: str | None = None
) -> tuple[dict[str, Any], str]:
    """Create or replace the feature's rate, with its audit row in the same transaction (under
    `request_id`: a console confirmation's, used once). Returns the rate and the row's id."""
    # Locks the feature's row (FOR UPDATE) so `before` is what this change replaced, even when
    # two operators set one feature at once (the second waits, then sees the first's).
    before = (
        await conn.execute(select(rates).where(rates.c.feature == rate.feature).with_for_update())
    ).first()
    now = utcnow()
    values = {**rate.as_dict(), "updated_at": now}
    statement = pg_insert(rates).values(**values, created_at=now)
    # One row per feature whatever races: the primary key makes the second insert an update.
    statement = statement.on_conflict_do_update(index_elements=["feature"], set_=values)
    row = (await conn.execute(statement.returning(rates))).one()
    entry = Entry(
        "set_rate",
        None,
        rate.feature,
        rate.as_dict(),
        _rate(before).as_dict() if before is not None else {},
        rate.as_dict(),
    )
    if request_id is None:
        entry_id = await audit_trail.record_action(conn, operator, entry)
    else:
        entry_id = await audit_trail.record(conn, operator, entry, request_id)
    return rate_out(row), entry_id
