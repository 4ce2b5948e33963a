"""The credit check: one read through the credit reader; an account is opened on first sight.

A check is one statement on the hot path's pool (one round trip, no transaction; batched with
others under load). Only an unknown identity costs more: its account is opened by
`open_account`, the one way the hot path creates an account, shared with charges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.accounts.hot.reader import AccountReader
from ciris_billing.accounts.service import NO_USES_LEFT, Identity, ensure_account
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


def credit_status(account: Mapping[Any, Any], pricing: Pricing) -> CreditStatus:
    """What a check answers for this account (a row's mapping or a reader's record)."""
    status = account["status"]
    free = int(account["free_uses_remaining"])
    paid = int(account["paid_uses_remaining"])
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
    )


async def check_credit(
    reader: AccountReader, engine: AsyncEngine, identity: Identity, pricing: Pricing
) -> CreditStatus:
    """May this identity go on? One read; an unknown identity's account is opened first."""
    account: Mapping[Any, Any] | None = await reader.read(identity)
    if account is None:
        row, _created = await open_account(engine, identity, pricing)
        account = row._mapping
    return credit_status(account, pricing)


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
