"""Revenue from lots (issue 25): what was sold, earned, broken, refunded and is still owed.

Only paid lots carry money (free and promotional lots carry none). Per paid lot, with P what
was paid for it and U its uses, every movement that takes uses out of the lot for good moves
its *exhausted* count k forward, and the lot's value of its first k uses is

    value(k) = floor(P * k / U)

so a movement from k to k + n is worth value(k + n) - value(k): rounding is per lot and
cumulative, and once all U uses are gone the values add up to value(U) = P exactly (no minor
unit lost or invented). The movements, by what they mean:

- consumption (charges, captures; `opening` rows of the lots migration): **recognized**;
- expiry, void, negative adjustment (`expired`, `void`, `adjustment` rows): **breakage**;
- refund take-backs (`refund`, `owed_taken`, `dispute_lost` rows): the uses' value leaves
  deferred revenue; the money refunded (the `refund` rows' amount) is **refunds**, and the
  difference (value of the uses taken back - money refunded) is **recognized** (negative when
  a refund returns money for uses already consumed: revenue reversed);
- dispute holds (`dispute_hold` +, `dispute_won` -): the held uses' value is counted under
  refunds while the dispute holds them (a chargeback in waiting) and comes back if it is won.

**Deferred** at an instant = sum over paid lots of (P - value(k)): paid uses not yet consumed,
at their lot's cost basis. Its change over a period is exactly purchases - refunds -
recognized - breakage, so every report row satisfies

    deferred_end = deferred_start + purchases - refunds - recognized - breakage.

Within one UTC day a lot's movements are taken in a fixed order (dispute, consumption, refund,
breakage), so the report is the same whichever granularity asks.

Example: a pack of 3 uses for 1000 (cents). Day 1: one use consumed, value(1) - value(0) =
333 recognized. Day 2: one more, value(2) - value(1) = 666 - 333 = 333. Day 3: the last use
expires, value(3) - value(2) = 1000 - 666 = 334 breakage. 333 + 333 + 334 = 1000. Had the
buyer been refunded 334 on day 3 instead (the last use taken back): refunds 334, recognized
334 - 334 = 0; 333 + 333 + 0 + 334 = 1000 again.

Reads only: the movements are the ledger's rows (charges and credits name their lots and the
uses they moved), so nothing is added to a charge (ledger/statements.py stays as it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

Granularity = Literal["day", "month"]

FIELDS = (
    "period",
    "currency",
    "purchases_minor",
    "refunds_minor",
    "recognized_minor",
    "breakage_minor",
    "deferred_start_minor",
    "deferred_end_minor",
)

# What each ledger row kind means for a paid lot's exhausted uses (the step's order within a
# day: 0 dispute, 1 consumption, 2 refund, 3 breakage). Rows of other kinds never take from a
# paid lot for good (grants add lots; free_period and free_grant are free lots).
STEP_OF_KIND = {
    "dispute_hold": 0,
    "dispute_won": 0,
    "opening": 1,
    "refund": 2,
    "owed_taken": 2,
    "dispute_lost": 2,
    "expired": 3,
    "void": 3,
    "adjustment": 3,
}

_KIND_STEP_SQL = (
    "CASE c.kind "
    + " ".join(f"WHEN '{kind}' THEN {step}" for kind, step in STEP_OF_KIND.items())
    + " END"
)


# The per-(lot, day) movements of the paid lots from :start to :end, each lot starting from its
# exhausted uses before :start (revenue_lot_states, kept by reports/rollups.py up to the
# rollup's day; :start is that day), and their values per currency and day.
def _value(k: str) -> str:
    """value(k) = floor(P * k / U), in numeric so P * k never overflows."""
    return f"floor(w.p::numeric * ({k}) / w.u)"


_MOVES = f"""
WITH paid AS (
    SELECT id, currency, amount_minor AS p, uses_granted AS u FROM lots
    WHERE kind = 'paid' AND amount_minor > 0 AND uses_granted > 0
), moves AS (
    SELECT x.lot_id, ch.created_at AS at, 1 AS step, x.n AS uses
    FROM charges ch, unnest(ch.lot_ids, ch.lot_uses) AS x(lot_id, n)
    WHERE ch.lot_ids IS NOT NULL AND ch.created_at >= :start AND ch.created_at < :end
    UNION ALL
    SELECT x.lot_id, c.created_at, {_KIND_STEP_SQL}, -x.n
    FROM credits c, unnest(c.lot_ids, c.lot_uses) AS x(lot_id, n)
    WHERE c.lot_ids IS NOT NULL AND c.created_at >= :start AND c.created_at < :end
      AND c.kind IN ({", ".join(f"'{kind}'" for kind in STEP_OF_KIND)})
)
"""  # noqa: S608 (our own constants)

FIGURES = (
    _MOVES  # noqa: S608 (our own constants)
    + f"""
, per_day AS (
    SELECT m.lot_id, (m.at AT TIME ZONE 'UTC')::date AS day,
           coalesce(sum(m.uses) FILTER (WHERE m.step = 0), 0) AS s0,
           coalesce(sum(m.uses) FILTER (WHERE m.step = 1), 0) AS s1,
           coalesce(sum(m.uses) FILTER (WHERE m.step = 2), 0) AS s2,
           coalesce(sum(m.uses) FILTER (WHERE m.step = 3), 0) AS s3
    FROM moves m JOIN paid ON paid.id = m.lot_id
    GROUP BY 1, 2
), walked AS (
    SELECT d.day, paid.currency, paid.p, paid.u, d.s0, d.s1, d.s2, d.s3,
           coalesce(st.exhausted_uses, 0) + coalesce(sum(d.s0 + d.s1 + d.s2 + d.s3) OVER (
               PARTITION BY d.lot_id ORDER BY d.day
               ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS k0
    FROM per_day d JOIN paid ON paid.id = d.lot_id
    LEFT JOIN revenue_lot_states st ON st.lot_id = d.lot_id
)
SELECT w.currency, w.day,
       sum({_value("w.k0 + w.s0")} - {_value("w.k0")}) AS disputed,
       sum({_value("w.k0 + w.s0 + w.s1")} - {_value("w.k0 + w.s0")}) AS consumed,
       sum({_value("w.k0 + w.s0 + w.s1 + w.s2")} - {_value("w.k0 + w.s0 + w.s1")}) AS taken_back,
       sum({_value("w.k0 + w.s0 + w.s1 + w.s2 + w.s3")} - {_value("w.k0 + w.s0 + w.s1 + w.s2")})
           AS broken
FROM walked w
GROUP BY 1, 2
"""  # noqa: S608 (our own constants)
)

# Each paid lot's exhausted uses moved from :start to :end (what rollups.py adds to its state).
EXHAUSTED = (
    _MOVES
    + """
SELECT m.lot_id, sum(m.uses) AS uses FROM moves m JOIN paid ON paid.id = m.lot_id
GROUP BY m.lot_id
"""
)

PURCHASES = """
SELECT currency, (created_at AT TIME ZONE 'UTC')::date AS day, sum(amount_minor) AS amount
FROM lots
WHERE kind = 'paid' AND uses_granted > 0 AND created_at >= :start AND created_at < :end
GROUP BY 1, 2
"""

REFUNDS = """
SELECT currency, (created_at AT TIME ZONE 'UTC')::date AS day, sum(amount_minor) AS amount
FROM credits
WHERE kind = 'refund' AND created_at >= :start AND created_at < :end
GROUP BY 1, 2
"""


@dataclass(frozen=True, slots=True)
class DayFigures:
    purchases: int = 0
    refunds: int = 0
    recognized: int = 0
    breakage: int = 0


@dataclass(frozen=True, slots=True)
class RevenueRow:
    period: str
    currency: str
    purchases_minor: int
    refunds_minor: int
    recognized_minor: int
    breakage_minor: int
    deferred_start_minor: int
    deferred_end_minor: int

    def as_dict(self) -> dict[str, int | str]:
        return {name: getattr(self, name) for name in FIELDS}


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def period_of(day: date, granularity: Granularity) -> str:
    return day.isoformat() if granularity == "day" else day.strftime("%Y-%m")


def periods(first: date, last: date, granularity: Granularity) -> list[str]:
    """Every period from `first` to `last` (inclusive), in order (empty ones too)."""
    seen: list[str] = []
    day = first
    while day <= last:
        name = period_of(day, granularity)
        if not seen or seen[-1] != name:
            seen.append(name)
        day += timedelta(days=1)
    return seen


async def day_figures(
    conn: AsyncConnection, start: datetime, end: datetime
) -> dict[tuple[str, date], DayFigures]:
    """Each (currency, day)'s figures from the ledger's rows from `start` to `end`, every paid
    lot starting from its exhausted uses in revenue_lot_states (which must be as of `start`)."""
    params = {"start": start, "end": end}
    figures: dict[tuple[str, date], dict[str, int]] = {}

    def add(key: tuple[str, date], name: str, amount: int) -> None:
        figures.setdefault(key, {}).setdefault(name, 0)
        figures[key][name] += amount

    for row in await conn.execute(text(PURCHASES), params):
        add((row.currency, row.day), "purchases", int(row.amount))
    for row in await conn.execute(text(REFUNDS), params):
        add((row.currency, row.day), "refunds", int(row.amount))
        add((row.currency, row.day), "recognized", -int(row.amount))
    for row in await conn.execute(text(FIGURES), params):
        key = (row.currency, row.day)
        add(key, "refunds", int(row.disputed))
        add(key, "recognized", int(row.consumed) + int(row.taken_back))
        add(key, "breakage", int(row.broken))
    return {key: DayFigures(**values) for key, values in figures.items()}


def plus(one: DayFigures, other: DayFigures) -> DayFigures:
    return DayFigures(
        one.purchases + other.purchases,
        one.refunds + other.refunds,
        one.recognized + other.recognized,
        one.breakage + other.breakage,
    )


def change(figures: DayFigures) -> int:
    """What a day's figures do to deferred revenue."""
    return figures.purchases - figures.refunds - figures.recognized - figures.breakage


def report_rows(
    currency: str,
    deferred: int,
    by_day: dict[date, DayFigures],
    first: date,
    last: date,
    granularity: Granularity,
) -> list[RevenueRow]:
    """One row per period from `first` to `last`, deferred rolled from `deferred` (at the
    start of `first`) so the identity holds exactly on every row."""
    totals = {name: DayFigures() for name in periods(first, last, granularity)}
    for day, figures in by_day.items():
        if first <= day <= last:
            name = period_of(day, granularity)
            totals[name] = plus(totals[name], figures)
    rows = []
    for name, figures in totals.items():
        end = deferred + change(figures)
        rows.append(
            RevenueRow(
                name,
                currency,
                figures.purchases,
                figures.refunds,
                figures.recognized,
                figures.breakage,
                deferred,
                end,
            )
        )
        deferred = end
    return rows
