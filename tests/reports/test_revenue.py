"""Issue 25 items 1 and 2: revenue from lots, to the cent, across months (the test clock).

The installation sells 3 uses for 1000 (333.33... per use: the per-lot cumulative rounding
shows), gives 1 free use (no revenue), and an operator sells a paid lot of 4 uses at 250 each
that expires in 40 days. Buyers consume, are refunded, a lot is voided and one expires.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import text

from ciris_billing import clock
from ciris_billing.reports import rollups
from tests.reports.support import (
    REVENUE,
    USAGE,
    advance,
    buy,
    charge,
    identity_holds,
    paid_grant,
    paid_lot,
    refund,
    report,
    report_csv,
    run_jobs,
    shop,
    void,
    who,
)
from tests.support.api import Api

__all__ = ["shop"]

ROLLUPS = ("revenue_days", "revenue_lot_states", "revenue_rollup", "usage_days", "usage_active")
FIGURES = ("purchases_minor", "refunds_minor", "recognized_minor", "breakage_minor")


def month(at: datetime) -> str:
    return at.strftime("%Y-%m")


async def test_revenue_to_the_cent_across_months(shop: Api) -> None:
    api = shop
    expected: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(FIGURES, 0))

    def book(name: str, amount: int) -> None:
        expected[month(clock.now())][name] += amount

    start = clock.now()
    a, b, c, d = who("a"), who("b"), who("c"), who("d")
    # A buys 3 uses for 1000 and spends 2: the free use, then one paid (1000 * 1 // 3 = 333).
    await buy(api, a)
    book("purchases_minor", 1000)
    await charge(api, a, 2)
    book("recognized_minor", 333)
    # B is sold 4 uses at 250 by an operator, expiring in 40 days.
    await paid_grant(api, b, 4, 250, 40)
    book("purchases_minor", 1000)
    # C buys, spends the free use and one paid (333), then is refunded all of the 1000: the two
    # unused uses come back (their value 1000 - 333 = 667), and 333 of revenue is reversed.
    bought_c = await buy(api, c)
    book("purchases_minor", 1000)
    await charge(api, c, 2)
    await refund(api, bought_c)
    book("refunds_minor", 1000)
    book("recognized_minor", 333 - 333)

    # Next month: A spends its last two paid uses (1000 - 333 = 667: the lot's total is 1000).
    await advance(api, 35)
    # A report now rolls up the closed days (the first month's) once; later ones read them.
    first_month = await report(
        api,
        REVENUE,
        granularity="month",
        **{"from": start.date().isoformat(), "to": start.date().isoformat()},
    )
    assert first_month[0]["deferred_end_minor"] == 667 + 1000
    await charge(api, a, 2)
    book("recognized_minor", 667)
    # B spends one of its uses (250: the lot that expires goes before the free use) ...
    await charge(api, b, 1)
    book("recognized_minor", 250)
    # ... and D buys and the operator voids the lot before any use: all of it is breakage.
    await buy(api, d)
    book("purchases_minor", 1000)
    await void(api, await paid_lot(api, d))
    book("breakage_minor", 1000)
    # B's lot expires with 3 uses unused: 750 of breakage, when the job writes it off.
    await advance(api, 10)
    await run_jobs(api)
    book("breakage_minor", 750)
    end = clock.now()
    # The recovery run also rolled the closed days up (to 15 minutes ago's day).
    async with api.engine.connect() as conn:
        rolled = await conn.scalar(text("SELECT rolled_until FROM revenue_rollup"))
    assert rolled == (end - timedelta(minutes=15)).date()

    params = {"from": start.date().isoformat(), "to": end.date().isoformat()}
    monthly = await report(api, REVENUE, granularity="month", **params)
    assert [row["period"] for row in monthly] == sorted(expected)
    for row in monthly:
        assert {name: row[name] for name in FIGURES} == expected[row["period"]], row
        assert row["currency"] == "USD"
        assert identity_holds(row), row
    assert monthly[0]["deferred_start_minor"] == 0
    # Everything bought is accounted for: nothing deferred at the end (A used all, B expired,
    # C was refunded, D voided), and the lots' totals are exactly what was paid.
    assert monthly[-1]["deferred_end_minor"] == 0
    totals = {name: sum(row[name] for row in monthly) for name in FIGURES}
    assert (
        totals["recognized_minor"] + totals["breakage_minor"] + totals["refunds_minor"]
        == (totals["purchases_minor"])
    )

    daily = await report(api, REVENUE, granularity="day", **params)
    assert all(identity_holds(row) for row in daily)
    assert (end.date() - start.date()).days + 1 == len(daily)
    for name in FIGURES:
        assert sum(row[name] for row in daily) == totals[name]
    # Deferred between the months, from a report starting there: what A and B had left.
    later = await report(api, REVENUE, granularity="day", **{**params, "from": daily[20]["period"]})
    assert later[0]["deferred_start_minor"] == daily[20]["deferred_start_minor"] == 667 + 1000

    # The rolled-up days read back the same as the ledger's rows computed afresh.
    usage_before = [await report(api, USAGE, granularity=per, **params) for per in ("day", "month")]
    async with api.engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {', '.join(ROLLUPS)}"))
    assert usage_before == [
        await report(api, USAGE, granularity=per, **params) for per in ("day", "month")
    ]
    assert await report(api, REVENUE, granularity="day", **params) == daily
    assert await report(api, REVENUE, granularity="month", **params) == monthly

    as_csv = await report_csv(api, REVENUE, granularity="month", **params)
    assert [
        {k: (v if k in ("period", "currency") else int(v)) for k, v in row.items()}
        for row in as_csv
    ] == monthly
    assert all(identity_holds(row) for row in as_csv)

    usage = await report(api, USAGE, granularity="month", **params)
    first, second = usage
    assert (first["free_uses"], first["paid_uses"], first["promotional_uses"]) == (2, 2, 0)
    assert (second["free_uses"], second["paid_uses"]) == (0, 3)
    assert (first["new_accounts"], first["converted_accounts"]) == (3, 2)
    assert (second["new_accounts"], second["converted_accounts"]) == (1, 1)
    assert (first["active_accounts"], second["active_accounts"]) == (2, 2)
    assert first["uses_by_feature"] == {"(none)": 4}
    usage_csv = await report_csv(api, USAGE, granularity="month", **params)
    assert [int(row["paid_uses"]) for row in usage_csv] == [2, 3]
    assert (await api.audit()).clean


async def test_reports_need_the_admin_key_and_a_sane_span(shop: Api) -> None:
    api = shop
    params = {"from": "2026-02-01", "to": "2026-01-01"}
    assert (await api.get(REVENUE, "read", **params)).status_code == 403
    assert (await api.get(REVENUE, "admin", **params)).status_code == 422
    assert (await api.get(REVENUE, "admin", **{"from": "2026-01-01"})).status_code == 422
    empty = await report(api, REVENUE, **{"from": "2026-01-01", "to": "2026-01-03"})
    assert [row["period"] for row in empty] == ["2026-01-01", "2026-01-02", "2026-01-03"]
    assert all(row["deferred_end_minor"] == 0 and identity_holds(row) for row in empty)


async def test_two_rolls_at_once_roll_each_day_once(shop: Api) -> None:
    """The job and a report rolling at the same moment: one computes the closed days, the
    other waits on the rollup's row and finds nothing left (no duplicate day, no error)."""
    api = shop
    user = who("rolls")
    await buy(api, user)
    await charge(api, user, 3)
    # Three days on: at least two whole days are closed whatever the time of day (a day is
    # closed 15 minutes after it ends, rollups.GRACE; two days on, in the first 15 minutes
    # after midnight UTC, only one was, and this test failed then).
    await advance(api, 3)

    async def roll_once() -> int:
        async with api.engine.begin() as conn:
            return await rollups.roll(conn)

    done = await asyncio.gather(roll_once(), roll_once())
    assert sorted(done)[0] == 0
    assert sorted(done)[1] >= 2
    async with api.engine.connect() as conn:
        days = (await conn.execute(text("SELECT day, recognized_minor FROM revenue_days"))).all()
    assert [row.recognized_minor for row in days] == [666]
    assert (await api.audit()).clean


async def dispute(api: Api, payment_id: str, status: str) -> None:
    path = f"/v1/billing/sandbox/payment_intents/{payment_id}/dispute"
    answer = await api.post(path, {"status": status}, scope="admin")
    assert answer.status_code in (200, 201), answer.text


async def test_disputes_hold_deferred_revenue_under_refunds_until_they_close(shop: Api) -> None:
    """A dispute holds the purchase's unused uses: their value leaves deferred revenue, under
    refunds (a chargeback in waiting); won, it comes back; lost, it stays gone. The identity
    holds on every row, and a lot's figures still add up to what was paid."""
    api = shop
    won, lost = who("dispute-won"), who("dispute-lost")
    bought_won, bought_lost = await buy(api, won), await buy(api, lost)
    await charge(api, won, 2)  # the free use, then one paid: 333 recognized
    await charge(api, lost, 2)
    await dispute(api, bought_won["payment_id"], "needs_response")
    await dispute(api, bought_lost["payment_id"], "needs_response")
    today = clock.now().date().isoformat()
    params = {"from": today, "to": today}
    [held] = await report(api, REVENUE, **params)
    # Both lots' two unused uses are held: out of deferred. Within one day a lot's dispute
    # movements are valued before its consumption (reports/revenue.py), so the held uses are
    # worth value(2) = 666 and the use consumed value(3) - value(2) = 334, on each lot.
    assert (held["purchases_minor"], held["recognized_minor"]) == (2000, 668)
    assert (held["refunds_minor"], held["deferred_end_minor"]) == (1332, 0)
    await dispute(api, bought_won["payment_id"], "won")
    await dispute(api, bought_lost["payment_id"], "lost")
    [closed] = await report(api, REVENUE, **params)
    assert identity_holds(closed)
    # Won: its lot's day is one use consumed (333) and 667 deferred; lost: 666 held for good
    # and 334 consumed.
    assert (closed["recognized_minor"], closed["refunds_minor"]) == (333 + 334, 666)
    assert closed["deferred_end_minor"] == 667
    assert closed["recognized_minor"] + closed["refunds_minor"] + closed["deferred_end_minor"] == (
        2000
    )
    assert (await api.audit()).clean


async def test_usage_counts_rated_charges_under_their_feature(shop: Api) -> None:
    """Uses by feature (issue 25 item 2 with issue 24's rates): a charge by `feature` and
    `quantity` counts under its feature, one by `uses` under "(none)"."""
    api = shop
    rate = {"feature": "tokens", "units_per_use": 100, "rounding": "up"}
    assert (await api.post("/v1/billing/rates", rate, scope="admin")).status_code == 200
    user = who("rated")
    await buy(api, user)
    rated = await api.post("/v1/billing/charges", {**user, "feature": "tokens", "quantity": 250})
    assert rated.status_code == 201, rated.text
    assert rated.json()["uses"] == 3
    await charge(api, user, 1)
    today = clock.now().date().isoformat()
    [row] = await report(api, USAGE, **{"from": today, "to": today})
    assert row["uses_by_feature"] == {"(none)": 1, "tokens": 3}
    assert (await api.audit()).clean
