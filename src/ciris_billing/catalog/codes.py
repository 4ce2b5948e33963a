"""Promotion codes: a discount (percent or an amount) on some or all packs, with an optional
limit of redemptions, once per account or not, an expiry, and a switch.

A code is redeemed when a purchase begins (payments/service.py start_purchase), in the
purchase's transaction: of 50 concurrent purchases with a code limited to 10, exactly 10 are
discounted and 40 refused, by construction (`redeem`). A purchase that never gets paid keeps
its redemption (as a Stripe promotion code applied to a checkout); a purchase whose payment the
provider refuses to create gives it back (`give_back`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.audit_trail import Entry, Operator
from ciris_billing.catalog.audit import audit
from ciris_billing.db import (
    insert_or_ignore,
    new_id,
    promotion_codes,
    promotion_redemptions,
    utcnow,
)
from ciris_billing.errors import CatalogConflict, PromotionCodeNotFound, PromotionCodeRefused


@dataclass(frozen=True, slots=True)
class PromotionCode:
    code: str
    percent_off: int | None = None
    amount_off_minor: int | None = None
    pack_ids: list[str] | None = None  # None: every pack
    max_redemptions: int | None = None
    once_per_account: bool = False
    expires_at: datetime | None = None
    active: bool = True
    redemptions: int = 0

    def body(self) -> dict[str, Any]:
        body = asdict(self)
        body["expires_at"] = None if self.expires_at is None else self.expires_at.isoformat()
        return body

    def price_after(self, price_minor: int) -> int:
        """The price once discounted: never below 0 (a percent's discount rounds down)."""
        if self.percent_off is not None:
            return price_minor - price_minor * self.percent_off // 100
        return max(0, price_minor - (self.amount_off_minor or 0))


def _code(row: Row[Any]) -> PromotionCode:
    return PromotionCode(
        row.code,
        row.percent_off,
        None if row.amount_off_minor is None else int(row.amount_off_minor),
        None if row.pack_ids is None else list(row.pack_ids),
        None if row.max_redemptions is None else int(row.max_redemptions),
        row.once_per_account,
        row.expires_at,
        row.active,
        int(row.redemptions),
    )


async def list_codes(conn: AsyncConnection) -> list[PromotionCode]:
    rows = await conn.execute(
        select(promotion_codes).order_by(promotion_codes.c.created_at, promotion_codes.c.code)
    )
    return [_code(row) for row in rows]


async def get_code(conn: AsyncConnection, code: str) -> PromotionCode:
    row = (
        await conn.execute(select(promotion_codes).where(promotion_codes.c.code == code))
    ).first()
    if row is None:
        raise PromotionCodeNotFound(f"No promotion code {code!r}")
    return _code(row)


async def create_code(
    conn: AsyncConnection, operator: Operator, code: PromotionCode, *, request_id: str | None = None
) -> PromotionCode:
    now = utcnow()
    values = asdict(code)
    values.pop("redemptions")
    # Safe under a double create: the primary key lets one insert win; the other is a 409.
    inserted = await conn.execute(
        insert_or_ignore(promotion_codes)
        .values(**values, created_at=now, updated_at=now)
        .returning(promotion_codes.c.code)
    )
    if inserted.first() is None:
        raise CatalogConflict(f"A promotion code {code.code!r} exists already")
    await audit(
        conn,
        operator,
        request_id,
        Entry("promotion_code_create", None, code.code, code.body(), {}, code.body()),
    )
    return code


async def update_code(
    conn: AsyncConnection,
    operator: Operator,
    code: str,
    changes: dict[str, Any],
    *,
    request_id: str | None = None,
) -> PromotionCode:
    """Switch a code on or off, or change its limit or expiry (never below its redemptions:
    the table's CHECK refuses)."""
    before = await get_code(conn, code)
    row = (
        await conn.execute(
            promotion_codes.update()
            .where(promotion_codes.c.code == code)
            .values(**changes, updated_at=utcnow())
            .returning(*promotion_codes.c)
        )
    ).one()
    after = _code(row)
    detail = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in changes.items()}
    await audit(
        conn,
        operator,
        request_id,
        Entry("promotion_code_update", None, code, detail, before.body(), after.body()),
    )
    return after


async def redeem(
    conn: AsyncConnection, code: str, account_id: str, pack_id: str, purchase_id: str
) -> PromotionCode:
    """Count one redemption of `code` for a purchase of `pack_id` by the account, in the
    caller's transaction; PromotionCodeRefused (with `reason`) when it cannot be."""
    now = utcnow()
    found = (
        await conn.execute(select(promotion_codes).where(promotion_codes.c.code == code))
    ).first()
    if found is None:
        raise PromotionCodeRefused(f"No promotion code {code!r}", reason="unknown")
    current = _code(found)
    if not current.active:
        raise PromotionCodeRefused("This promotion code is no longer active", reason="inactive")
    if current.expires_at is not None and current.expires_at <= now:
        raise PromotionCodeRefused("This promotion code has expired", reason="expired")
    if current.pack_ids is not None and pack_id not in current.pack_ids:
        raise PromotionCodeRefused(
            f"This promotion code does not apply to the pack {pack_id!r}", reason="not_for_pack"
        )
    # Exact under concurrency: the UPDATE re-checks the limit on the locked row, so of racing
    # redemptions only as many as the limit leaves can pass; the others match no row.
    counted = (
        await conn.execute(
            promotion_codes.update()
            .where(
                promotion_codes.c.code == code,
                promotion_codes.c.active.is_(True),
                (promotion_codes.c.expires_at.is_(None)) | (promotion_codes.c.expires_at > now),
                (promotion_codes.c.max_redemptions.is_(None))
                | (promotion_codes.c.redemptions < promotion_codes.c.max_redemptions),
            )
            .values(redemptions=promotion_codes.c.redemptions + 1, updated_at=now)
            .returning(*promotion_codes.c)
        )
    ).first()
    if counted is None:
        raise PromotionCodeRefused(
            "This promotion code has been redeemed as many times as it may be",
            reason="exhausted",
        )
    # once_per_account: the partial unique index on (code, account_id) lets one redemption per
    # account exist; a second inserts nothing, and raising rolls back the count above.
    inserted = await conn.execute(
        insert_or_ignore(promotion_redemptions)
        .values(
            id=new_id("red"),
            code=code,
            account_id=account_id,
            purchase_id=purchase_id,
            once_per_account=current.once_per_account,
            created_at=now,
        )
        .returning(promotion_redemptions.c.id)
    )
    if inserted.first() is None:
        raise PromotionCodeRefused(
            "This account has already redeemed this promotion code", reason="already_redeemed"
        )
    return _code(counted)


async def give_back(conn: AsyncConnection, code: str, purchase_id: str) -> None:
    """Undo the redemption made for `purchase_id` (its payment could not be created)."""
    removed = await conn.execute(
        promotion_redemptions.delete()
        .where(promotion_redemptions.c.purchase_id == purchase_id)
        .returning(promotion_redemptions.c.id)
    )
    if removed.first() is not None:
        # Only the transaction that deleted the redemption row gives its count back.
        await conn.execute(
            promotion_codes.update()
            .where(promotion_codes.c.code == code)
            .values(redemptions=promotion_codes.c.redemptions - 1, updated_at=utcnow())
        )
