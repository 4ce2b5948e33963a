"""The credit check: one read through the credit reader; an account is opened on first sight.

A check is one statement on the hot path's pool (one round trip, no transaction; batched with
others under load). Only an unknown identity costs more: its account is opened by
`open_account`, the one way the hot path creates an account, shared with charges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.accounts.hot.reader import AccountReader
from ciris_billing.accounts.service import NO_USES_LEFT, Identity, ensure_account, get_account
from ciris_billing.db import iso, utcnow
from ciris_billing.ledger import free_periods
from ciris_billing.ledger.balance import usable
from ciris_billing.pricing import Pricing
from ciris_billing.unit_of_work import unit_of_work


@dataclass(frozen=True, slots=True)
class CreditStatus:
    has_credit: bool
    credits_remaining: int
    plan_name: str
    reason: str | None
    free_uses_remaining: int
    total_uses: int
    held_uses: int  # by active reservations; free/paid counts above are what is available
    purchase_required: bool
    purchase_price_minor: int | None
    purchase_uses: int | None
    # The usable uses of the soonest-expiring lot(s): {"uses", "expires_at"}, or None.
    next_expiry: dict[str, Any] | None = None


def credit_status(
    account: Mapping[Any, Any], pricing: Pricing, at: datetime | None = None
) -> CreditStatus:
    """What a check answers for this account at `at` (a row's mapping or a reader's record:
    the counters, next_expiry_at and, when it is set, the wallet): lots expired at `at` are
    not counted, whether or not the expiry job has swept them."""
    status = account["status"]
    now = usable(account, at or utcnow())
    free, paid = now.free, now.other
    has_credit = status == "active" and free + paid > 0
    if status != "active":
        why = account["status_reason"]
        reason: str | None = "Account is suspended" + (f": {why}" if why else "")
    else:
        reason = None if has_credit else NO_USES_LEFT
    purchase_required = status == "active" and not has_credit
    return CreditStatus(
        has_credit=has_credit,
        credits_remaining=paid,
        plan_name=account["plan_name"],
        reason=reason,
        free_uses_remaining=free,
        total_uses=int(account["total_uses"]),
        # The counters above are what is available: a hold moved its uses out of them.
        held_uses=int(account["reserved_free_uses"]) + int(account["reserved_paid_uses"]),
        purchase_required=purchase_required,
        purchase_price_minor=pricing.price_per_purchase_minor if purchase_required else None,
        purchase_uses=pricing.paid_uses_per_purchase if purchase_required else None,
        next_expiry=(
            None
            if now.next_expiry_at is None
            else {"uses": now.next_expiry_uses, "expires_at": iso(now.next_expiry_at)}
        ),
    )


async def check_credit(
    reader: AccountReader,
    engine: AsyncEngine,
    identity: Identity,
    pricing: Pricing,
    at: datetime | None = None,
) -> CreditStatus:
    """May this identity go on? One read; an unknown identity's account is opened first (and,
    with monthly free uses, a month's first check adds its free lot: one unit of work, once)."""
    at = at or utcnow()
    account: Mapping[Any, Any] | None = await reader.read(identity)
    if account is None or free_periods.is_due(account["free_period"], at, pricing):
        row = await _opened(engine, identity, pricing, at)
        account = row._mapping
    return credit_status(account, pricing, at)


async def _opened(
    engine: AsyncEngine, identity: Identity, pricing: Pricing, at: datetime
) -> Row[Any]:
    """The identity's account, opened if new, its month's free lot added if due (committed)."""
    async with unit_of_work(engine) as work:
        conn = await work.connection()
        row, _created = await ensure_account(conn, identity, pricing)
        if free_periods.is_due(row.free_period, at, pricing) and await free_periods.renew(
            conn, row.id, row.currency, at, pricing
        ):
            row = await get_account(conn, identity)
        return row


async def open_account(
    engine: AsyncEngine, identity: Identity, pricing: Pricing
) -> tuple[Row[Any], bool]:
    """The identity's account (and whether it was created now), opened with its free uses in a
    unit of work of its own, committed before this returns.

    Why its own: the hot path's next statement (the check's answer, the charge's retry) runs on
    another connection, the statement pool's, and must see the account. Safe when first
    requests race: `ensure_account` lets exactly one INSERT win and grants the free uses once.
    """
    async with unit_of_work(engine) as work:
        return await ensure_account(await work.connection(), identity, pricing)
