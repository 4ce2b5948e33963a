"""Operator actions on accounts: grants and adjustments, suspension, erasure and export."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.accounts.service import Identity, ensure_account, find_account, get_account
from ciris_billing.db import (
    accounts,
    charges,
    credits,
    disputes,
    idempotency_keys,
    iso,
    purchases,
    utcnow,
)
from ciris_billing.errors import AccountNotFound, AdjustmentBelowZero
from ciris_billing.ledger import write_credit
from ciris_billing.pricing import Pricing


@dataclass(frozen=True, slots=True)
class Grant:
    account: Row[Any]
    uses: int
    kind: str


async def grant(
    conn: AsyncConnection,
    identity: Identity,
    uses: int,
    reason: str,
    pricing: Pricing,
    idempotency_key: str | None = None,
) -> Grant:
    """Add (grant) or remove (adjustment) paid uses, with the reason on the ledger row."""
    account, _ = await ensure_account(conn, identity, pricing)
    # Conditional update: a negative adjustment can never take the balance below zero.
    changed = await conn.execute(
        accounts.update()
        .where(accounts.c.id == account.id, accounts.c.paid_uses_remaining + uses >= 0)
        .values(paid_uses_remaining=accounts.c.paid_uses_remaining + uses, updated_at=utcnow())
    )
    if not changed.rowcount:
        raise AdjustmentBelowZero(
            f"Removing {-uses} uses would take the paid balance "
            f"({account.paid_uses_remaining}) below zero"
        )
    kind = "grant" if uses > 0 else "adjustment"
    await write_credit(
        conn,
        account_id=account.id,
        kind=kind,
        currency=account.currency,
        paid=uses,
        description=reason,
        idempotency_key=idempotency_key,
    )
    return Grant(await get_account(conn, identity), uses, kind)


async def set_status(
    conn: AsyncConnection, identity: Identity, status: str, reason: str | None
) -> Row[Any]:
    account = await get_account(conn, identity)
    await conn.execute(
        accounts.update()
        .where(accounts.c.id == account.id)
        .values(status=status, status_reason=reason, updated_at=utcnow())
    )
    return await get_account(conn, identity)


def erased_identity(identity: Identity) -> Identity:
    """Where an erased account lives: a one-way digest instead of the personal identifier, so
    the account can still be found (and exported) by whoever knows the original identity."""
    digest = hashlib.sha256(f"{identity.oauth_provider}\0{identity.external_id}".encode())
    return Identity(identity.oauth_provider, f"erased:{digest.hexdigest()}")


async def find_including_erased(conn: AsyncConnection, identity: Identity) -> Row[Any]:
    account = await find_account(conn, identity) or await find_account(
        conn, erased_identity(identity)
    )
    if account is None:
        raise AccountNotFound(f"No account for {identity.oauth_provider} {identity.external_id}")
    return account


ERASED_FIELDS = (
    "accounts.external_id",
    "accounts.customer_email",
    "accounts.display_name",
    "accounts.status_reason",
    "purchases.customer_email",
    "charges.description",
    "charges.metadata",
    "stored idempotent responses",
)


async def erase(conn: AsyncConnection, identity: Identity) -> Row[Any]:
    """Erase personal data; the ledger rows and every amount and count stay."""
    account = await get_account(conn, identity)
    now = utcnow()
    await conn.execute(
        accounts.update()
        .where(accounts.c.id == account.id)
        .values(
            external_id=erased_identity(identity).external_id,
            customer_email=None,
            display_name=None,
            status_reason=None,
            erased_at=now,
            updated_at=now,
        )
    )
    await conn.execute(
        purchases.update().where(purchases.c.account_id == account.id).values(customer_email=None)
    )
    await conn.execute(
        charges.update()
        .where(charges.c.account_id == account.id)
        .values(description=None, metadata={})
    )
    # Replayable responses quote the identity and email: drop this account's.
    await conn.execute(
        idempotency_keys.delete().where(
            idempotency_keys.c.response_body.contains(f'"account_id":"{account.id}"')
        )
    )
    return await find_including_erased(conn, identity)


async def export(conn: AsyncConnection, identity: Identity) -> dict[str, Any]:
    """Everything held about an account, as JSON-ready data."""
    account = await find_including_erased(conn, identity)

    async def rows(table: Any, order: Any) -> list[dict[str, Any]]:
        result = await conn.execute(
            select(table).where(table.c.account_id == account.id).order_by(order)
        )
        return [_jsonable(row._mapping) for row in result]

    purchase_rows = await rows(purchases, purchases.c.created_at)
    purchase_ids = [row["id"] for row in purchase_rows]
    dispute_rows = [
        _jsonable(row._mapping)
        for row in await conn.execute(
            select(disputes).where(disputes.c.purchase_id.in_(purchase_ids))
        )
    ]
    return {
        "account": _jsonable(account._mapping),
        "charges": await rows(charges, charges.c.created_at),
        "credits": await rows(credits, credits.c.created_at),
        "purchases": purchase_rows,
        "disputes": dispute_rows,
    }


def _jsonable(mapping: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(mapping).items():
        if key == "last_charge_free_uses":
            continue
        out[key] = iso(value) if hasattr(value, "isoformat") else value
    return out
