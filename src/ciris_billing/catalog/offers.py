"""What an account may buy (its plan's active packs in its currency: a 402's `offers`, the
payment page's and the portal's) and which pack a purchase buys."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.accounts.service import Identity, find_account
from ciris_billing.catalog.packs import DEFAULT_PACK, Pack, get_pack, list_packs
from ciris_billing.catalog.plans import Plan, plan_for
from ciris_billing.errors import CurrencyMismatch, PackNotFound, PackNotOffered
from ciris_billing.pricing import Pricing


def _in_plan(plan: Plan, pack: Pack) -> bool:
    return plan.pack_ids is None or pack.pack_id in plan.pack_ids


async def offered_packs(conn: AsyncConnection, pricing: Pricing, account: Any) -> list[Pack]:
    """The packs the account may buy now: active, in its plan, in its currency."""
    plan = await plan_for(conn, pricing, account.plan_name)
    return [
        pack
        for pack in await list_packs(conn, pricing)
        if pack.active and pack.currency == account.currency and _in_plan(plan, pack)
    ]


def offer_bodies(found: list[Pack]) -> list[dict[str, Any]]:
    return [pack.body() for pack in found]


async def pack_to_buy(
    conn: AsyncConnection, pricing: Pricing, account: Any, pack_id: str | None
) -> Pack:
    """The pack a new purchase buys (the default when none is named); 422 when the account may
    not buy it: archived, not in its plan, or in another currency."""
    try:
        pack = await get_pack(conn, pricing, pack_id or DEFAULT_PACK)
    except PackNotFound as missing:
        raise PackNotOffered(missing.detail, pack_id=pack_id, reason="unknown") from None
    if not pack.active:
        raise PackNotOffered(
            f"The pack {pack.pack_id!r} is archived", pack_id=pack.pack_id, reason="archived"
        )
    plan = await plan_for(conn, pricing, account.plan_name)
    if not _in_plan(plan, pack):
        raise PackNotOffered(
            f"The plan {plan.name!r} does not offer the pack {pack.pack_id!r}",
            pack_id=pack.pack_id,
            reason="not_in_plan",
        )
    if pack.currency != account.currency:
        raise CurrencyMismatch(
            f"The pack {pack.pack_id!r} is in {pack.currency} but the account is in "
            f"{account.currency}: buy a pack in {account.currency}",
            currency=pack.currency,
            account_currency=account.currency,
        )
    return pack


async def offers_for(engine: AsyncEngine, pricing: Pricing, identity: Identity) -> list[Any]:
    """A 402's `offers` (its own short read, after the refusal: never on a success)."""
    async with engine.connect() as conn:
        return await offers_in(conn, pricing, identity)


async def offers_in(conn: AsyncConnection, pricing: Pricing, identity: Identity) -> list[Any]:
    account = await find_account(conn, identity)
    if account is None:
        return []
    return offer_bodies(await offered_packs(conn, pricing, account))
