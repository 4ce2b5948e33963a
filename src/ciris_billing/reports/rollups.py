"""The revenue report over closed days' rollups (issue 25 item 6: < 1 s over 1M charges,
nothing added to a charge).

A UTC day that ended more than GRACE ago is closed: its movements are all in (a transaction
stamps its rows with its own "now" and lasts far less than GRACE), and each paid lot's value
before it is fixed, so its figures never change. `roll` computes the closed days not yet
rolled from the ledger's rows (reports/revenue.py), once: `revenue_days` gets one row per
(day, currency) that had any movement, with deferred revenue at its end, and
`revenue_lot_states` each paid lot's exhausted uses so far; `revenue_rollup.rolled_until` says
up to where; the usage report's `usage_days` and `usage_active` are rolled with them
(reports/usage.py). The recovery job rolls every run (job_recovery.py), and a report rolls first
whatever is still due, so it is never stale.

A report then reads its closed days from `revenue_days` and computes only the days since
`rolled_until` (normally today) from the ledger, each lot starting from its state.

Concurrency: `roll` locks the rollup's row (FOR UPDATE) before it reads `rolled_until` again,
so two rolls never compute the same days (and with nothing due it neither locks nor writes);
a report takes FOR KEY SHARE on it, so no roll commits between its reads (the days, the states
and `rolled_until` are one picture), while reports never wait for each other.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import clock
from ciris_billing.db import accounts, lots, revenue_days, revenue_rollup
from ciris_billing.reports import revenue, usage
from ciris_billing.reports.revenue import DayFigures, Granularity, RevenueRow, day_start

GRACE = timedelta(minutes=15)
# Before anything was rolled: every day from here on is computed from the ledger.
EPOCH = date(1970, 1, 1)

# Run under the rollup's row lock (one roll at a time), once per range of days: each lot's
# state moves forward by exactly that range's movements.
ADD_EXHAUSTED = (
    "INSERT INTO revenue_lot_states (lot_id, exhausted_uses) "
    + revenue.EXHAUSTED
    + " ON CONFLICT (lot_id) DO UPDATE SET "
    "exhausted_uses = revenue_lot_states.exhausted_uses + EXCLUDED.exhausted_uses"
)


def closed_until(now: datetime) -> date:
    """The first day not yet closed at `now`."""
    return (now - GRACE).date()


async def deferred_before(conn: AsyncConnection, currency: str, day: date) -> int:
    """Deferred revenue at the start of `day` (a rolled day): the end of the last rolled day
    with a movement before it (none: 0)."""
    found = await conn.scalar(
        select(revenue_days.c.deferred_end_minor)
        .where(revenue_days.c.currency == currency, revenue_days.c.day < day)
        .order_by(revenue_days.c.day.desc())
        .limit(1)
    )
    return int(found or 0)


async def roll(conn: AsyncConnection, now: datetime | None = None) -> int:
    """Roll the closed days not yet rolled (in the caller's transaction); how many days."""
    until = closed_until(now or clock.now())
    seen = await conn.scalar(select(revenue_rollup.c.rolled_until))
    if seen is not None and until <= seen:
        return 0  # nothing due: no lock, no write (reports do not queue behind each other)
    if seen is None:
        await conn.execute(
            insert(revenue_rollup)
            .values(id=1, rolled_until=EPOCH, updated_at=clock.now())
            .on_conflict_do_nothing()
        )
    # The lock serializes rolls: the second waits, then reads the first's rolled_until.
    rolled: date = (
        await conn.scalar(
            select(revenue_rollup.c.rolled_until).where(revenue_rollup.c.id == 1).with_for_update()
        )
        or EPOCH
    )
    if rolled == EPOCH:  # the first roll: from the first account's or lot's day (no row is older)
        oldest = await conn.scalar(
            select(
                func.least(
                    func.min(accounts.c.created_at),
                    select(func.min(lots.c.created_at)).scalar_subquery(),
                )
            )
        )
        rolled = min(oldest.astimezone(UTC).date(), until) if oldest else until
    if until <= rolled:
        return 0
    start, end = day_start(rolled), day_start(until)
    figures = await revenue.day_figures(conn, start, end)
    deferred: dict[str, int] = {}
    rows = []
    for (currency, day), found in sorted(figures.items(), key=lambda item: item[0][1]):
        if currency not in deferred:
            deferred[currency] = await deferred_before(conn, currency, rolled)
        deferred[currency] += revenue.change(found)
        rows.append(
            {
                "day": day,
                "currency": currency,
                "purchases_minor": found.purchases,
                "refunds_minor": found.refunds,
                "recognized_minor": found.recognized,
                "breakage_minor": found.breakage,
                "deferred_end_minor": deferred[currency],
            }
        )
    if rows:
        await conn.execute(insert(revenue_days), rows)
    await conn.execute(text(ADD_EXHAUSTED), {"start": start, "end": end})
    await usage.roll_usage(conn, rolled, until)
    await conn.execute(
        revenue_rollup.update()
        .where(revenue_rollup.c.id == 1)
        .values(rolled_until=until, updated_at=clock.now())
    )
    return (until - rolled).days


async def rolled_up(conn: AsyncConnection) -> date:
    """Roll what is due, then hold the rollup as it is until the transaction ends (no roll
    can commit meanwhile: see the module's docstring); up to where it is rolled."""
    await roll(conn)
    rolled = await conn.scalar(
        select(revenue_rollup.c.rolled_until)
        .where(revenue_rollup.c.id == 1)
        .with_for_update(key_share=True)
    )
    return rolled or EPOCH


async def usage_report(
    conn: AsyncConnection, first: date, last: date, granularity: Granularity
) -> list[usage.UsageRow]:
    """The usage report (reports/usage.py) over the rollups."""
    await rolled_up(conn)
    return await usage.usage_report(conn, first, last, granularity)


async def revenue_report(
    conn: AsyncConnection, currency: str, first: date, last: date, granularity: Granularity
) -> list[RevenueRow]:
    """The revenue report (reports/revenue.py's rows): rolled days read, the rest computed."""
    rolled = await rolled_up(conn)
    by_day: dict[date, DayFigures] = {}
    for row in await conn.execute(
        select(revenue_days).where(
            revenue_days.c.currency == currency,
            revenue_days.c.day >= first,
            revenue_days.c.day <= last,
        )
    ):
        by_day[row.day] = DayFigures(
            int(row.purchases_minor),
            int(row.refunds_minor),
            int(row.recognized_minor),
            int(row.breakage_minor),
        )
    deferred = await deferred_before(conn, currency, min(first, rolled))
    if last >= rolled:
        live = await revenue.day_figures(conn, day_start(rolled), day_start(last) + timedelta(1))
        for (found_currency, day), found in live.items():
            if found_currency != currency:
                continue
            if day < first:
                deferred += revenue.change(found)
            else:
                by_day[day] = found
    return revenue.report_rows(currency, deferred, by_day, first, last, granularity)
