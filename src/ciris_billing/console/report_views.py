"""The console's pictures of the reports: the overview's charts and the reports page's tables
(the same figures as the admin API's reports, reports/)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from markupsafe import Markup
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import clock
from ciris_billing.reports import charts, revenue, rollups, usage
from ciris_billing.reports.revenue import Granularity

WINDOWS = (30, 90)


@dataclass(frozen=True, slots=True)
class Reports:
    first: date
    last: date
    granularity: Granularity
    currency: str
    revenue: list[revenue.RevenueRow]
    usage: list[usage.UsageRow]


async def reports(
    conn: AsyncConnection, currency: str, first: date, last: date, granularity: Granularity
) -> Reports:
    return Reports(
        first,
        last,
        granularity,
        currency,
        await rollups.revenue_report(conn, currency, first, last, granularity),
        await rollups.usage_report(conn, first, last, granularity),
    )


def last_days(days: int) -> tuple[date, date]:
    """The last `days` UTC days, today included (the installation's clock)."""
    today = clock.now().date()
    return today - timedelta(days=days - 1), today


def overview_charts(found: Reports) -> list[Markup]:
    """Uses per day (free, promotional, paid), revenue recognized per day, the deferred
    balance, new and converting accounts."""
    days = [row.period for row in found.usage]
    money = found.currency
    return [
        charts.bars(
            "chart-uses",
            "Uses per day",
            days,
            [
                charts.Series("free", [row.free_uses for row in found.usage]),
                charts.Series("promotional", [row.promotional_uses for row in found.usage]),
                charts.Series("paid", [row.paid_uses for row in found.usage]),
            ],
        ),
        charts.bars(
            "chart-revenue",
            f"Revenue recognized per day ({money})",
            days,
            [charts.Series("recognized", [row.recognized_minor for row in found.revenue])],
            money=money,
        ),
        charts.line(
            "chart-deferred",
            f"Deferred revenue (unused paid uses, {money}) at the end of each day",
            days,
            [row.deferred_end_minor for row in found.revenue],
            money,
        ),
        charts.bars(
            "chart-accounts",
            "New and converting accounts per day",
            days,
            [
                charts.Series("new", [row.new_accounts for row in found.usage]),
                charts.Series("first purchase", [row.converted_accounts for row in found.usage]),
            ],
            stacked=False,
        ),
    ]
