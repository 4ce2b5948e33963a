"""Operator actions on accounts, audited whatever the door (issue 21 finding 10): the API's
admin routes and the CLI call these; each runs the service function (accounts/admin.py,
reservations.py) and writes its audit-trail row in the caller's transaction, so the row exists
exactly when the action committed. (The console's actions, console/actions.py, do the same
with their confirmation's one-time id.)"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import audit_trail
from ciris_billing.accounts import admin, reservations
from ciris_billing.accounts.service import Identity, find_account, get_account
from ciris_billing.audit_trail import Entry, Operator, account_state
from ciris_billing.pricing import Pricing


async def grant(
    conn: AsyncConnection,
    operator: Operator,
    identity: Identity,
    uses: int,
    reason: str,
    pricing: Pricing,
    idempotency_key: str | None = None,
    terms: admin.LotTerms = admin.LotTerms(),
) -> admin.Grant:
    """Grant (uses > 0: a lot on `terms`) or take back (uses < 0) paid uses; the ledger row
    carries the API key."""
    before = await find_account(conn, identity)
    done = await admin.grant(
        conn,
        identity,
        uses,
        reason,
        pricing,
        idempotency_key,
        api_key_id=operator.key_id,
        terms=terms,
    )
    detail: dict[str, Any] = {"uses": uses, "reason": reason}
    if done.lot_id is not None:
        detail |= {
            "lot_id": done.lot_id,
            "lot_kind": terms.kind,
            "priority": terms.priority,
            "expires_at": terms.expires_at.isoformat() if terms.expires_at else None,
        }
    entry = Entry(
        "grant" if uses > 0 else "adjust",
        done.account.id,
        None,
        detail,
        {} if before is None else account_state(before),
        account_state(done.account),
    )
    await audit_trail.record_action(conn, operator, entry)
    return done


async def set_status(
    conn: AsyncConnection, operator: Operator, identity: Identity, status: str, reason: str | None
) -> Row[Any]:
    """Suspend ('suspended') or reactivate ('active'). The reason stays on the account
    (erasable), not in the audit trail."""
    before = await get_account(conn, identity)
    row = await admin.set_status(conn, identity, status, reason)
    suspending = status == "suspended"
    entry = Entry(
        "suspend" if suspending else "reactivate",
        row.id,
        None,
        {"reason_given": bool(reason and reason.strip())} if suspending else {},
        account_state(before),
        account_state(row),
    )
    await audit_trail.record_action(conn, operator, entry)
    return row


async def set_low_balance_threshold(
    conn: AsyncConnection, operator: Operator, identity: Identity, uses: int | None
) -> tuple[Row[Any], int]:
    before = await get_account(conn, identity)
    row, in_force = await admin.set_low_balance_threshold(conn, identity, uses)
    entry = Entry(
        "low_balance_threshold",
        row.id,
        None,
        {"uses": uses},
        {"threshold_uses": before.low_balance_threshold_uses},
        {"threshold_uses": uses, "in_force": in_force},
    )
    await audit_trail.record_action(conn, operator, entry)
    return row, in_force


async def erase(conn: AsyncConnection, operator: Operator, identity: Identity) -> Row[Any]:
    before = await admin.find_including_erased(conn, identity)
    row = await admin.erase(conn, identity)
    entry = Entry(
        "erase",
        row.id,
        None,
        {"fields_erased": list(admin.ERASED_FIELDS)},
        {"erased": before.erased_at is not None, **account_state(before)},
        {"erased": True, **account_state(row)},
    )
    await audit_trail.record_action(conn, operator, entry)
    return row


async def release(
    conn: AsyncConnection, operator: Operator, reservation_id: str
) -> reservations.Outcome:
    """An operator gives a hold's uses back (the CLI; an integration's own release through the
    API is its traffic, not an operator action)."""
    outcome = await reservations.release(conn, reservation_id)
    entry = Entry(
        "release",
        outcome.account.id,
        reservation_id,
        {"uses": int(outcome.reservation.uses), "changed": outcome.changed},
        {},
        {"reservation": outcome.reservation.status, **account_state(outcome.account)},
    )
    await audit_trail.record_action(conn, operator, entry)
    return outcome
