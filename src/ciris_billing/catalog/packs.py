"""Packs: what a purchase buys (uses, a price in one currency, an optional lot expiry).

The default pack ("default") is the environment's (PAID_USES_PER_PURCHASE,
PRICE_PER_PURCHASE_MINOR, CURRENCY): never a row, so the guide's variables stay its truth.
Operators add others; archiving (`active` false) stops new purchases only: a purchase records
its price, uses and lot expiry when it begins (payments/purchases.py), so one in flight never
depends on its pack again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.audit_trail import Entry, Operator
from ciris_billing.catalog.audit import audit
from ciris_billing.db import insert_or_ignore, packs, utcnow
from ciris_billing.errors import CatalogConflict, PackNotFound
from ciris_billing.pricing import Pricing

DEFAULT_PACK = "default"


@dataclass(frozen=True, slots=True)
class Pack:
    pack_id: str
    name: str
    uses: int
    price_minor: int
    currency: str
    expires_in_days: int | None = None
    active: bool = True

    def body(self) -> dict[str, Any]:
        return asdict(self)


def default_pack(pricing: Pricing) -> Pack:
    return Pack(
        DEFAULT_PACK,
        f"{pricing.paid_uses_per_purchase} uses",
        pricing.paid_uses_per_purchase,
        pricing.price_per_purchase_minor,
        pricing.currency,
    )


def _pack(row: Row[Any]) -> Pack:
    return Pack(
        row.pack_id,
        row.name,
        int(row.uses),
        int(row.price_minor),
        row.currency,
        row.expires_in_days,
        row.active,
    )


async def list_packs(conn: AsyncConnection, pricing: Pricing) -> list[Pack]:
    """Every pack, the default first, then by creation."""
    rows = await conn.execute(select(packs).order_by(packs.c.created_at, packs.c.pack_id))
    return [default_pack(pricing), *(_pack(row) for row in rows)]


async def get_pack(conn: AsyncConnection, pricing: Pricing, pack_id: str) -> Pack:
    if pack_id == DEFAULT_PACK:
        return default_pack(pricing)
    row = (await conn.execute(select(packs).where(packs.c.pack_id == pack_id))).first()
    if row is None:
        raise PackNotFound(f"No pack {pack_id!r}")
    return _pack(row)


async def create_pack(
    conn: AsyncConnection, operator: Operator, pack: Pack, *, request_id: str | None = None
) -> Pack:
    if pack.pack_id == DEFAULT_PACK:
        raise CatalogConflict("The default pack is defined by the environment")
    now = utcnow()
    # Safe under a double create: the primary key lets one insert win; the other is a 409.
    inserted = await conn.execute(
        insert_or_ignore(packs)
        .values(**asdict(pack), created_at=now, updated_at=now)
        .returning(packs.c.pack_id)
    )
    if inserted.first() is None:
        raise CatalogConflict(f"A pack {pack.pack_id!r} exists already")
    await audit(
        conn,
        operator,
        request_id,
        Entry("pack_create", None, pack.pack_id, pack.body(), {}, pack.body()),
    )
    return pack


async def update_pack(
    conn: AsyncConnection,
    operator: Operator,
    pack_id: str,
    changes: dict[str, Any],
    *,
    request_id: str | None = None,
) -> Pack:
    """Change a pack's name, price, uses, expiry or `active` (archive); not its currency."""
    if pack_id == DEFAULT_PACK:
        raise CatalogConflict("The default pack is defined by the environment")
    row = (
        await conn.execute(select(packs).where(packs.c.pack_id == pack_id).with_for_update())
    ).first()
    if row is None:
        raise PackNotFound(f"No pack {pack_id!r}")
    before = _pack(row)
    after = replace(before, **changes)
    await conn.execute(
        packs.update().where(packs.c.pack_id == pack_id).values(**changes, updated_at=utcnow())
    )
    await audit(
        conn,
        operator,
        request_id,
        Entry("pack_update", None, pack_id, changes, before.body(), after.body()),
    )
    return after
