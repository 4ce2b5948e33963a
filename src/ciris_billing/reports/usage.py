"""Usage (issue 25): uses by lot kind and by feature, active, new and converting accounts.

Uses by kind come from the charges' lots (each charge names the lots it took from and how
many of each; a lot's kind says free, promotional or paid). Active accounts: those with a
charge in the period; new: created in it; converted: whose first purchased lot (a purchase
or an auto top-up) came in it (free -> paid).

Closed days are read from the rollups that reports/rollups.py keeps (`usage_days`: uses per
day, kind and feature; `usage_active`: active accounts per closed day and closed month); the
days since its `rolled_until` are counted from the charges (their BRIN index on created_at
finds them). A month only partly in the report is counted over its part, from the charges.

By feature: a charge made by `feature` and `quantity` (rates, issue 24) records its feature;
uses of charges made by `uses` are under NO_FEATURE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import revenue_rollup, usage_active, usage_days
from ciris_billing.reports.revenue import Granularity, day_start, period_of, periods

NO_FEATURE = "(none)"

FIELDS = (
    "period",
    "free_uses",
    "promotional_uses",
    "paid_uses",
    "active_accounts",
    "new_accounts",
    "converted_accounts",
)

USES = """
SELECT (ch.created_at AT TIME ZONE 'UTC')::date AS day, l.kind,
       coalesce(ch.feature, :no_feature) AS feature,
       sum(x.n) AS uses
FROM charges ch
CROSS JOIN LATERAL unnest(ch.lot_ids, ch.lot_uses) AS x(lot_id, n)
JOIN lots l ON l.id = x.lot_id
WHERE ch.lot_ids IS NOT NULL AND ch.created_at >= :start AND ch.created_at < :end
GROUP BY 1, 2, 3
"""

# Active accounts per period (distinct over the period, not a sum of days).
ACTIVE = """
SELECT to_char(ch.created_at AT TIME ZONE 'UTC', :fmt) AS period,
       count(DISTINCT ch.account_id) AS accounts
FROM charges ch
WHERE ch.created_at >= :start AND ch.created_at < :end
GROUP BY 1
"""

NEW = """
SELECT to_char(created_at AT TIME ZONE 'UTC', :fmt) AS period, count(*) AS accounts
FROM accounts WHERE created_at >= :start AND created_at < :end
GROUP BY 1
"""

CONVERTED = """
SELECT to_char(first_paid AT TIME ZONE 'UTC', :fmt) AS period, count(*) AS accounts
FROM (SELECT account_id, min(created_at) AS first_paid FROM lots
      WHERE kind = 'paid' AND source IN ('purchase', 'auto_topup') GROUP BY account_id) AS f
WHERE first_paid >= :start AND first_paid < :end
GROUP BY 1
"""

FORMATS = {"day": "YYYY-MM-DD", "month": "YYYY-MM"}


@dataclass
class UsageRow:
    period: str
    free_uses: int = 0
    promotional_uses: int = 0
    paid_uses: int = 0
    active_accounts: int = 0
    new_accounts: int = 0
    converted_accounts: int = 0
    uses_by_feature: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        found: dict[str, object] = {name: getattr(self, name) for name in FIELDS}
        found["uses_by_feature"] = dict(sorted(self.uses_by_feature.items()))
        return found


def _span(first: date, last_excluded: date, fmt: str) -> dict[str, object]:
    return {
        "start": day_start(first),
        "end": day_start(last_excluded),
        "fmt": fmt,
        "no_feature": NO_FEATURE,
    }


def _month_end(day: date) -> date:
    """The first day of the next month."""
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1)


async def roll_usage(conn: AsyncConnection, rolled: date, until: date) -> None:
    """Roll days from `rolled` to `until` (excluded), and the months closed by then (called
    by reports/rollups.py under the rollup's lock: once per day and month)."""
    params = _span(rolled, until, FORMATS["day"])
    found = [dict(row._mapping) for row in await conn.execute(text(USES), params)]
    if found:
        await conn.execute(usage_days.insert(), found)
    active = [dict(row._mapping) for row in await conn.execute(text(ACTIVE), params)]
    month = rolled.replace(day=1)
    while _month_end(month) <= until:
        if _month_end(month) > rolled:  # closed by this roll: counted once, whole
            counted = await conn.execute(
                text(ACTIVE), _span(month, _month_end(month), FORMATS["month"])
            )
            active += [dict(row._mapping) for row in counted]
        month = _month_end(month)
    if active:
        await conn.execute(usage_active.insert(), active)


async def usage_report(
    conn: AsyncConnection, first: date, last: date, granularity: Granularity
) -> list[UsageRow]:
    """One row per period from `first` to `last` (inclusive; UTC days). The caller has
    rolled (reports/rollups.py) and holds the rollup's row (one picture)."""
    rolled = await conn.scalar(select(revenue_rollup.c.rolled_until)) or first
    after_last = last + timedelta(1)
    rows = {name: UsageRow(name) for name in periods(first, last, granularity)}
    fmt = FORMATS[granularity]
    stored = await conn.execute(
        select(usage_days).where(
            usage_days.c.day >= first, usage_days.c.day < min(rolled, after_last)
        )
    )
    live = await conn.execute(text(USES), _span(max(first, rolled), after_last, fmt))
    for found in [*stored, *live]:
        row = rows[period_of(found.day, granularity)]
        uses = int(found.uses)
        name = f"{found.kind}_uses"
        setattr(row, name, getattr(row, name) + uses)
        row.uses_by_feature[found.feature] = row.uses_by_feature.get(found.feature, 0) + uses
    await _active(conn, rows, first, after_last, rolled, granularity)
    whole = _span(first, after_last, fmt)
    for query, name in ((NEW, "new_accounts"), (CONVERTED, "converted_accounts")):
        for found in await conn.execute(text(query), whole):
            setattr(rows[found.period], name, int(found.accounts))
    return list(rows.values())


async def _active(
    conn: AsyncConnection,
    rows: dict[str, UsageRow],
    first: date,
    after_last: date,
    rolled: date,
    granularity: Granularity,
) -> None:
    """Active accounts: closed periods wholly in the report from usage_active, the others
    (today; a month cut by the report's ends or still open) counted from the charges."""
    fmt = FORMATS[granularity]
    live: list[tuple[date, date]] = []
    closed: list[str] = []
    for name in rows:
        if granularity == "day":
            start = date.fromisoformat(name)
            end = start + timedelta(1)
        else:
            start = date.fromisoformat(f"{name}-01")
            end = _month_end(start)
        if first <= start and end <= after_last and end <= rolled:
            closed.append(name)
        else:
            live.append((max(start, first), min(end, after_last)))
    if closed:
        for found in await conn.execute(
            select(usage_active).where(usage_active.c.period.in_(closed))
        ):
            rows[found.period].active_accounts = int(found.accounts)
    spans: list[tuple[date, date]] = []
    for start, end in live:  # adjacent periods in one scan (the days not rolled up: today)
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    for start, end in spans:
        for found in await conn.execute(text(ACTIVE), _span(start, end, fmt)):
            rows[found.period].active_accounts = int(found.accounts)
