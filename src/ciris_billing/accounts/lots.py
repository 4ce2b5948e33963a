"""An account's lots as the API, the CLI and the console show them, and an operator's void.

Listing: the open lots first, in the wallet's order (the consumption order: the next use comes
from the first one with uses left), each with what it has left in its wallet slot; `status`
`active`, or `expired` for one past its expires_at that the expiry job has not closed yet
(unusable already), or `voided` for one voided while open holds still name it. Then, when
asked, the closed ones (used, expired, voided, erased: nothing left), newest first.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import audit_trail
from ciris_billing.accounts.admin import LotTerms
from ciris_billing.accounts.lot_expiry import record_closed
from ciris_billing.accounts.schemas import GrantCreate
from ciris_billing.accounts.service import Identity, get_account
from ciris_billing.audit_trail import Entry, Operator, account_state
from ciris_billing.db import accounts, iso, lots, utcnow
from ciris_billing.errors import InvalidRequest, LotNotFound, LotNotOpen
from ciris_billing.ledger.closing import VOID, Closed, Why, close_lot, lot_account
from ciris_billing.ledger.rules import DEFAULT_PRIORITY

INCLUDE = ("active", "expired", "all")


def grant_terms(body: GrantCreate, now: datetime) -> LotTerms:
    """The lot a grant makes; an expiry not in the future is refused (422)."""
    expires_at = body.expires_at
    if body.expires_in_days is not None:
        expires_at = now + timedelta(days=body.expires_in_days)
    if expires_at is not None and expires_at <= now:
        raise InvalidRequest("expires_at must be in the future")
    return LotTerms(
        kind=body.kind or "promotional",
        priority=DEFAULT_PRIORITY if body.priority is None else body.priority,
        expires_at=expires_at,
        cost_basis_minor=body.cost_basis_minor,
    )


def lot_body(lot: Row[Any], left: int, status: str) -> dict[str, Any]:
    return {
        "lot_id": lot.id,
        "kind": lot.kind,
        "uses_granted": int(lot.uses_granted),
        "uses_remaining": left,
        "priority": int(lot.priority),
        "expires_at": iso(lot.expires_at) if lot.expires_at else None,
        "source": lot.source,
        "created_at": iso(lot.created_at),
        "status": status,
        "cost_basis_minor": None if lot.cost_basis_minor is None else int(lot.cost_basis_minor),
        "closed_at": iso(lot.closed_at) if lot.closed_at else None,
    }


def next_expiry(account: Row[Any], at: datetime) -> tuple[int, datetime] | None:
    """The soonest expiry among the account's usable lots (its row's wallet) and how many
    uses expire then; None when nothing left expires."""
    dated = [
        (when, int(left))
        for when, left in zip(account.lot_expires, account.lot_left, strict=True)
        if when is not None and when > at and left > 0
    ]
    if not dated:
        return None
    soonest = min(when for when, _ in dated)
    return sum(left for when, left in dated if when == soonest), soonest


def open_status(lot: Row[Any], at: datetime) -> str:
    if lot.voided_at is not None:
        return "voided"
    if lot.expires_at is not None and lot.expires_at <= at:
        return "expired"
    return "active"


async def account_lots(
    conn: AsyncConnection, account: Row[Any], *, closed: bool, at: datetime | None = None
) -> list[dict[str, Any]]:
    """The account's lots (its row as read): open ones in consumption order, then (`closed`)
    the closed ones, newest first."""
    at = at or utcnow()
    ids, left = list(account.lot_ids), list(account.lot_left)
    found = {
        row.id: row
        for row in await conn.execute(select(lots).where(lots.c.account_id == account.id))
    }
    listed = [
        lot_body(found[lot_id], int(uses), open_status(found[lot_id], at))
        for lot_id, uses in zip(ids, left, strict=True)
        if lot_id in found
    ]
    if closed:
        ended = sorted(
            (row for row in found.values() if row.status != "active"),
            key=lambda row: (row.closed_at or row.created_at, row.created_at, row.id),
            reverse=True,
        )
        listed += [lot_body(row, 0, row.status) for row in ended]
    return listed


async def list_lots(
    conn: AsyncConnection, identity: Identity, include: str = "active"
) -> list[dict[str, Any]]:
    """GET .../lots: AccountNotFound (404) for an unknown account."""
    account = await get_account(conn, identity)
    return await account_lots(conn, account, closed=include != "active")


async def void(
    conn: AsyncConnection,
    operator: Operator,
    lot_id: str,
    reason: str | None,
    idempotency_key: str | None = None,
    request_id: str | None = None,
) -> tuple[Closed, str]:
    """Void what the lot has left now (uses held by open holds stay theirs: ledger/closing.py),
    with the audit trail's row (its id returned; `request_id`: the console confirmation's),
    in the caller's transaction. LotNotFound (404), LotNotOpen (409) for a lot already closed
    or voided."""
    account_id = await lot_account(conn, lot_id)
    if account_id is None:
        raise LotNotFound(f"No lot {lot_id}")
    before = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).one()
    closed = await close_lot(
        conn,
        lot_id,
        Why(VOID, description=reason, api_key_id=operator.key_id, idempotency_key=idempotency_key),
    )
    if closed is None:
        raise LotNotOpen(f"Lot {lot_id} is not open (used up, expired, voided or erased)")
    await record_closed(conn, closed)
    entry = Entry(
        "void_lot",
        account_id,
        lot_id,
        {"uses": closed.uses, "reason": reason, "left_wallet": closed.removed},
        account_state(before),
        account_state(closed.account),
    )
    if request_id is None:
        return closed, await audit_trail.record_action(conn, operator, entry)
    return closed, await audit_trail.record(conn, operator, entry, request_id)


def void_body(closed: Closed, reason: str | None) -> dict[str, Any]:
    return {
        "lot_id": closed.lot_id,
        "account_id": closed.account_id,
        "status": "voided",
        "uses_voided": closed.uses,
        "reason": reason,
        # Still in the wallet while open holds name it (their uses stay theirs).
        "held_open": not closed.removed,
    }
