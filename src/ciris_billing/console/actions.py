"""The console's actions: each calls the service function the API and the CLI call (no second
implementation), in one unit of work, and writes its audit-trail row in the same transaction.

Every action takes the confirmation's one-time `request_id`: checked first (a confirmation
already used is refused before anything happens, before any provider call), and unique in the
audit trail (a concurrent second submit rolls back whole: audit_trail.record).

Lock order: the actions on an account alone (grant, suspend, reactivate, erase) lock its row
first, as every writer does, so `before` and `after` are exactly what this action changed. The
others take the locks of the service they call, in its order (refunds: purchase, then account;
reservations: reservation, then account), and read `before` without a lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import audit_trail, auth
from ciris_billing.accounts import admin, lots, reservations
from ciris_billing.accounts.service import Identity
from ciris_billing.audit_trail import Entry, Operator
from ciris_billing.console import outgoing, queries
from ciris_billing.console.queries import account_of_payment, event
from ciris_billing.db import accounts, api_keys, iso, purchases, utcnow
from ciris_billing.db import audit_trail as audit_table
from ciris_billing.errors import (
    AccountNotFound,
    ActionAlreadyDone,
    InvalidRequest,
    PurchaseNotFound,
    ReservationNotFound,
)
from ciris_billing.observability import log
from ciris_billing.payments import refunds
from ciris_billing.payments import service as payments
from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.portal.links import revoke_links
from ciris_billing.pricing import Pricing
from ciris_billing.unit_of_work import UnitOfWork
from ciris_billing.webhooks import inbox

MAX_GRANT = 1_000_000


# An account's state as the audit trail records it (the same whatever the door).
balances = audit_trail.account_state


def _purchase_state(row: Any) -> dict[str, Any]:
    return {
        "status": payments.api_status(row.status),
        "credited": row.credited_at is not None,
        "refunded_minor": int(row.refunded_minor),
        "uses_refunded": int(row.uses_refunded),
    }


async def _unused(conn: AsyncConnection, request_id: str) -> None:
    if not request_id or len(request_id) > 64:
        raise InvalidRequest("This confirmation is not valid; start the action again")
    used = await conn.scalar(select(audit_table.c.id).where(audit_table.c.request_id == request_id))
    if used is not None:
        raise ActionAlreadyDone("This confirmation was already used; the action was done once")


async def _locked_account(conn: AsyncConnection, account_id: str) -> Row[Any]:
    # Accounts first, as every writer locks them (see the module's doc).
    row = (
        await conn.execute(select(accounts).where(accounts.c.id == account_id).with_for_update())
    ).first()
    if row is None:
        raise AccountNotFound(f"No account {account_id}")
    return row


def _identity(row: Any) -> Identity:
    return Identity(row.oauth_provider, row.external_id)


@dataclass(frozen=True, slots=True)
class Done:
    entry_id: str
    account_id: str | None
    secret: str | None = None  # a new API key, shown once


async def grant(
    work: UnitOfWork,
    pricing: Pricing,
    operator: Operator,
    account_id: str,
    uses: int,
    reason: str,
    request_id: str,
    expires_in_days: int | None = None,
) -> Done:
    """Grant (uses > 0; a lot expiring in `expires_in_days`, or never) or take back (uses < 0)
    paid uses: accounts.admin.grant."""
    if uses == 0 or abs(uses) > MAX_GRANT:
        raise InvalidRequest(f"uses must be between -{MAX_GRANT} and {MAX_GRANT}, not 0")
    if not reason.strip():
        raise InvalidRequest("A reason is required (it goes on the ledger row)")
    if expires_in_days is not None and (uses < 0 or not 1 <= expires_in_days <= 36_600):
        raise InvalidRequest("An expiry (1 to 36600 days) is for a grant only")
    conn = await work.connection()
    await _unused(conn, request_id)
    before = await _locked_account(conn, account_id)
    expires_at = None if expires_in_days is None else utcnow() + timedelta(days=expires_in_days)
    done = await admin.grant(
        conn,
        _identity(before),
        uses,
        reason.strip(),
        pricing,
        f"console:{request_id}",
        terms=admin.LotTerms(expires_at=expires_at),
    )
    detail: dict[str, Any] = {"uses": uses, "reason": reason.strip()}
    if done.lot_id is not None and expires_at is not None:
        detail |= {"lot_id": done.lot_id, "expires_at": iso(expires_at)}
    entry = Entry(
        "grant" if uses > 0 else "adjust",
        account_id,
        None,
        detail,
        balances(before),
        balances(done.account),
    )
    return await _recorded(conn, operator, entry, request_id)


async def set_status(
    work: UnitOfWork,
    operator: Operator,
    account_id: str,
    suspend: bool,
    reason: str | None,
    request_id: str,
) -> Done:
    """Suspend or reactivate: accounts.admin.set_status. The reason is kept on the account
    (erasable), not in the audit trail."""
    conn = await work.connection()
    await _unused(conn, request_id)
    before = await _locked_account(conn, account_id)
    status = "suspended" if suspend else "active"
    after = await admin.set_status(
        conn, _identity(before), status, (reason or "").strip() or None if suspend else None
    )
    entry = Entry(
        "suspend" if suspend else "reactivate",
        account_id,
        None,
        {"reason_given": bool(reason and reason.strip())} if suspend else {},
        balances(before),
        balances(after),
    )
    return await _recorded(conn, operator, entry, request_id)


async def erase(work: UnitOfWork, operator: Operator, account_id: str, request_id: str) -> Done:
    """Erase the account's personal data (the ledger stays): accounts.admin.erase."""
    conn = await work.connection()
    await _unused(conn, request_id)
    before = await _locked_account(conn, account_id)
    if before.erased_at is not None:
        raise InvalidRequest("This account was erased already")
    after = await admin.erase(conn, _identity(before))
    entry = Entry(
        "erase",
        account_id,
        None,
        {"fields_erased": list(admin.ERASED_FIELDS)},
        {"erased": False, **balances(before)},
        {"erased": after.erased_at is not None, **balances(after)},
    )
    return await _recorded(conn, operator, entry, request_id)


async def refund(
    work: UnitOfWork,
    provider: PaymentProvider,
    operator: Operator,
    payment_id: str,
    amount_minor: int | None,
    reason: str | None,
    request_id: str,
) -> Done:
    """Refund all (None) or part of a purchase: payments.refunds.make_refund at the provider
    (its idempotency key from the confirmation), then record_refund and the audit row in one
    transaction."""
    conn = await work.connection()
    await _unused(conn, request_id)
    purchase = await payments.find_purchase(conn, provider.name, payment_id)
    if purchase is None:
        raise PurchaseNotFound(f"No purchase with payment {payment_id}")
    account_before = await _account(conn, purchase.account_id)
    before = {**_purchase_state(purchase), "paid_uses": int(account_before.paid_uses_remaining)}
    made = await refunds.make_refund(
        work, provider, payment_id, amount_minor, f"refund-{payment_id}-console-{request_id}"
    )
    conn = await work.connection()  # a new transaction: make_refund committed around the call
    result = await refunds.record_refund(conn, provider.name, made, reason)
    after_purchase = await payments.get_purchase(conn, provider.name, payment_id)
    account_after = await _account(conn, purchase.account_id)
    entry = Entry(
        "refund",
        purchase.account_id,
        payment_id,
        {
            "amount_minor": made.amount_minor,
            "currency": purchase.currency,
            "refund_id": made.refund_id,
            "uses_reversed": result["uses_reversed"],
            "shortfall_uses": result["shortfall_uses"],
            "reason": reason,
        },
        before,
        {**_purchase_state(after_purchase), "paid_uses": int(account_after.paid_uses_remaining)},
    )
    log.info(
        f"{provider.name}_refund_created", payment_id=payment_id, amount_minor=made.amount_minor
    )
    return await _recorded(conn, operator, entry, request_id)


async def release(
    work: UnitOfWork, operator: Operator, reservation_id: str, request_id: str
) -> Done:
    """Give a hold's uses back now: accounts.reservations.release."""
    conn = await work.connection()
    await _unused(conn, request_id)
    held = await queries.reservation(conn, reservation_id)
    if held is None:
        raise ReservationNotFound(f"No reservation {reservation_id}")
    account_before = await _account(conn, held.account_id)
    outcome = await reservations.release(conn, reservation_id)
    if outcome.changed:
        log.info(
            "reservation_released",
            reservation_id=reservation_id,
            account_id=held.account_id,
            uses=int(held.uses),
            by="console",
        )
    entry = Entry(
        "release",
        held.account_id,
        reservation_id,
        {"uses": int(held.uses), "changed": outcome.changed},
        {"reservation": held.status, **balances(account_before)},
        {"reservation": outcome.reservation.status, **balances(outcome.account)},
    )
    return await _recorded(conn, operator, entry, request_id)


async def void_lot(
    work: UnitOfWork, operator: Operator, lot_id: str, reason: str | None, request_id: str
) -> Done:
    """Void what a lot has left: accounts.lots.void (its audit row carries the request id)."""
    conn = await work.connection()
    await _unused(conn, request_id)
    closed, entry_id = await lots.void(conn, operator, lot_id, reason, request_id=request_id)
    log.info("lot_voided", lot_id=lot_id, account_id=closed.account_id, by="console")
    return Done(entry_id, closed.account_id)


async def replay(
    work: UnitOfWork,
    provider: PaymentProvider,
    operator: Operator,
    event_row_id: str,
    request_id: str,
) -> Done:
    """Handle a stored webhook event again: webhooks.inbox.handle (asks the provider first)."""
    conn = await work.connection()
    await _unused(conn, request_id)
    stored = await event(conn, event_row_id)
    if stored is None or stored.provider != provider.name:
        raise InvalidRequest(f"No stored {provider.name} event {event_row_id}")
    account_id = await account_of_payment(conn, stored.payment_id)
    handled = await inbox.handle(work, provider, stored.event_id)
    conn = await work.connection()
    after = await event(conn, event_row_id)
    assert after is not None
    entry = Entry(
        "replay",
        account_id,
        stored.event_id,
        {"type": stored.type, "outcome": handled.outcome},
        {"handled": stored.handled_at is not None, "attempts": int(stored.attempts)},
        {"handled": after.handled_at is not None, "attempts": int(after.attempts)},
    )
    return await _recorded(conn, operator, entry, request_id)


async def reconcile(
    work: UnitOfWork,
    provider: PaymentProvider,
    operator: Operator,
    payment_id: str,
    request_id: str,
) -> Done:
    """Bring a purchase in line with its payment at the provider: payments.reconcile_purchase."""
    conn = await work.connection()
    await _unused(conn, request_id)
    purchase = await payments.find_purchase(conn, provider.name, payment_id)
    if purchase is None:
        raise PurchaseNotFound(f"No purchase with payment {payment_id}")
    outcome = await payments.reconcile_purchase(work, provider, payment_id)
    conn = await work.connection()
    after = await payments.get_purchase(conn, provider.name, payment_id)
    entry = Entry(
        "reconcile",
        purchase.account_id,
        payment_id,
        {"outcome": outcome},
        _purchase_state(purchase),
        _purchase_state(after),
    )
    return await _recorded(conn, operator, entry, request_id)


async def create_key(
    work: UnitOfWork, operator: Operator, name: str, scopes: frozenset[str], request_id: str
) -> Done:
    """A new API key (auth.create_key); its secret is returned once and never stored."""
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidRequest("A key needs a name of 1 to 100 characters")
    conn = await work.connection()
    await _unused(conn, request_id)
    key_id, secret = await auth.create_key(conn, name, scopes)
    entry = Entry(
        "create_key",
        None,
        key_id,
        {"name": name, "scopes": sorted(scopes)},
        {},
        {"active": True},
    )
    done = await _recorded(conn, operator, entry, request_id)
    return Done(done.entry_id, None, secret)


async def revoke_key(work: UnitOfWork, operator: Operator, key_id: str, request_id: str) -> Done:
    """Revoke a key (auth.revoke_key): its requests are refused within API_KEY_CACHE_SECONDS,
    its console sessions at once."""
    conn = await work.connection()
    await _unused(conn, request_id)
    found = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
    if found is None or not await auth.revoke_key(conn, key_id):
        raise InvalidRequest(f"No active key {key_id}")
    entry = Entry(
        "revoke_key", None, key_id, {"name": found.name}, {"active": True}, {"active": False}
    )
    return await _recorded(conn, operator, entry, request_id)


async def set_endpoint(
    work: UnitOfWork, operator: Operator, endpoint_id: str, enabled: bool, request_id: str
) -> Done:
    """Disable (no more deliveries) or enable an outgoing webhook endpoint."""
    conn = await work.connection()
    await _unused(conn, request_id)
    entry, _row = await outgoing.set_enabled(conn, endpoint_id, enabled)
    return await _recorded(conn, operator, entry, request_id)


async def resend_delivery(
    work: UnitOfWork, operator: Operator, endpoint_id: str, delivery_id: str, request_id: str
) -> Done:
    """Send an outgoing delivery again (same event, same webhook-id) at the next run."""
    conn = await work.connection()
    await _unused(conn, request_id)
    entry = await outgoing.resend(conn, endpoint_id, delivery_id)
    return await _recorded(conn, operator, entry, request_id)


async def revoke_portal_links(
    work: UnitOfWork, operator: Operator, account_id: str, request_id: str
) -> Done:
    """Void every portal link of the account made until now: portal.links.revoke_links."""
    conn = await work.connection()
    await _unused(conn, request_id)
    before = await _locked_account(conn, account_id)
    revoked_at = await revoke_links(conn, account_id)
    entry = Entry(
        "revoke_portal_links",
        account_id,
        None,
        {"revoked_at": iso(revoked_at)},
        balances(before),
        balances(before),
    )
    return await _recorded(conn, operator, entry, request_id)


async def _account(conn: AsyncConnection, account_id: str) -> Row[Any]:
    return (await conn.execute(select(accounts).where(accounts.c.id == account_id))).one()


async def _recorded(
    conn: AsyncConnection, operator: Operator, entry: Entry, request_id: str
) -> Done:
    entry_id = await audit_trail.record(conn, operator, entry, request_id)
    log.info(
        "console_action",
        action=entry.action,
        account_id=entry.account_id,
        operator=operator.name,
        audit_id=entry_id,
    )
    return Done(entry_id, entry.account_id)


# Purchases of an account, for the refund form's choices (used by routes).
async def refundable(conn: AsyncConnection, account_id: str) -> list[Row[Any]]:
    return list(
        await conn.execute(
            select(purchases)
            .where(purchases.c.account_id == account_id, purchases.c.credited_at.is_not(None))
            .order_by(purchases.c.created_at.desc())
        )
    )
