"""Monthly free uses (FREE_USES_RESET=monthly): a new free lot each calendar month (UTC).

No job scans the accounts: an account's month's free lot is added by its first charge, hold or
check of the month. The hot statements require `accounts.free_period` to be the month of their
time (rules.free_period_current, a column compare); when it is not they make nothing, and the
slow path calls `renew` (in its unit of work) and sends the statement again: one extra round
trip, once per account per month. `renew` is a conditional UPDATE of free_period, so of racing
requests exactly one adds the lot. The lot expires at the next month's start (the previous
month's lot expired at this one's: unusable from that instant, ledger/rules.py).

A new account (accounts/service.py ensure_account) starts in its month: its first free lot
expires at the month's end and its free_period is set, also for an identity back after erasure
that gets no free uses, so it gets none before the next month.

Plans (catalog/plans.py) have their own free uses and reset: the renewal grants the terms of
the account's plan at the time of the renewal (a plan row, else the environment's), so a plan
change takes effect from the next period. An account on a monthly plan while
FREE_USES_RESET=never has a free_period too (set when it joined the plan, `start_periods`, or
was created on it), and the statements compare it as for everyone under monthly; an account
without one (NULL) passes (rules.free_period_current).
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts, plans
from ciris_billing.ledger.wallet import Credit, NewLot, add_lot
from ciris_billing.pricing import Pricing


def period_of(at: datetime) -> datetime:
    """The first instant (UTC) of the calendar month of `at`."""
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def next_period(at: datetime) -> datetime:
    """The first instant (UTC) of the month after the one of `at`."""
    start = period_of(at)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def is_due(free_period: datetime | None, at: datetime, pricing: Pricing) -> bool:
    """Whether the account's month's free lot is still to be added (monthly only: everyone's
    with FREE_USES_RESET=monthly, else an account that joined a monthly plan)."""
    monthly = pricing.monthly_free_uses or free_period is not None
    return monthly and free_period != period_of(at)


async def start_periods(conn: AsyncConnection, account_id: str, at: datetime) -> None:
    """An account joining a monthly plan: its periods count from the month of `at` (its next
    free lot comes at the next month's start). Nothing when it has a period already."""
    # Safe: a conditional UPDATE of the account's own row; a racing renewal wins or waits.
    await conn.execute(
        accounts.update()
        .where(accounts.c.id == account_id, accounts.c.free_period.is_(None))
        .values(free_period=period_of(at))
    )


async def renew(
    conn: AsyncConnection, account_id: str, currency: str, at: datetime, pricing: Pricing
) -> bool:
    """Add the account's free lot of the month of `at` if it is due (monthly only); True when
    this call added it. In the caller's transaction."""
    period = period_of(at)
    # Safe: once per account per month. The conditional UPDATE takes the account's row lock;
    # of racing renewals the first sets the period and the others, re-checking the locked row,
    # find it set and change nothing.
    renewed = (
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == account_id, accounts.c.free_period.is_distinct_from(period))
            .values(free_period=period)
            .returning(accounts.c.plan_name)
        )
    ).first()
    if renewed is None:
        return False
    # The terms of the account's plan now (a plan row), else the environment's.
    plan = (
        await conn.execute(
            select(plans.c.free_uses, plans.c.free_uses_reset).where(
                plans.c.name == renewed.plan_name
            )
        )
    ).first()
    free_uses = pricing.free_uses_per_account if plan is None else int(plan.free_uses)
    monthly = pricing.monthly_free_uses if plan is None else plan.free_uses_reset == "monthly"
    if monthly and free_uses:
        await add_lot(
            conn,
            account_id,
            NewLot(
                kind="free",
                uses=free_uses,
                source="free_period",
                expires_at=next_period(period),
            ),
            Credit(
                kind="free_period",
                currency=currency,
                description=f"Free uses for {period:%B %Y}",
            ),
            at=at,
        )
    return True
