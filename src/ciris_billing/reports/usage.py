"""Usage (issue 25): uses by lot kind and by feature, active, new and converting accounts.

Uses by kind come from the charges' lots (each charge names the lots it took from and how
many of each; a lot's kind says free, promotional or paid). Active accounts: those with a
charge in the period; new: created in it; converted: whose first purchased lot (a purchase
or an auto top-up) came in it (free -> paid).

By feature: charges carry no `feature` yet (the rates of the catalog add it), so every use is
under NO_FEATURE; `:no_feature AS feature` in USES is the one expression to change when
the column lands (`coalesce(ch.feature, :no_feature)`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

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
SELECT (ch.created_at AT TIME ZONE 'UTC')::date AS day, l.kind, :no_feature AS feature,
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


async def usage_report(
    conn: AsyncConnection, first: date, last: date, granularity: Granularity
) -> list[UsageRow]:
    """One row per period from `first` to `last` (inclusive; UTC days)."""
    params = {
        "start": day_start(first),
        "end": day_start(last) + timedelta(1),
        "fmt": FORMATS[granularity],
        "no_feature": NO_FEATURE,
    }
    rows = {name: UsageRow(name) for name in periods(first, last, granularity)}
    for found in await conn.execute(text(USES), params):
        row = rows[period_of(found.day, granularity)]
        uses = int(found.uses)
        name = f"{found.kind}_uses"
        setattr(row, name, getattr(row, name) + uses)
        row.uses_by_feature[found.feature] = row.uses_by_feature.get(found.feature, 0) + uses
    for query, name in ((ACTIVE, "active_accounts"), (NEW, "new_accounts")):
        for found in await conn.execute(text(query), params):
            setattr(rows[found.period], name, int(found.accounts))
    for found in await conn.execute(text(CONVERTED), params):
        rows[found.period].converted_accounts = int(found.accounts)
    return list(rows.values())
