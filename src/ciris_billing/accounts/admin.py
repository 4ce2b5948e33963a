"""Operator actions on accounts: grants and adjustments, suspension, erasure and export."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import installation
from ciris_billing.accounts.erasure import erased_digest, erased_external_id
from ciris_billing.accounts.service import (
    Identity,
    ensure_account,
    find_account,
    get_account,
    plan_with_paid_uses,
)
from ciris_billing.autotopup import cards
from ciris_billing.db import (
    accounts,
    audit_trail,
    charges,
    credits,
    disputes,
    events,
    idempotency_keys,
    iso,
    lots,
    purchases,
    reservations,
    utcnow,
    webhook_events,
)
from ciris_billing.errors import AccountNotFound, AdjustmentBelowZero
from ciris_billing.events.outbox import record_available_change, threshold_of
from ciris_billing.ledger import moves
from ciris_billing.ledger.moves import PAID_KINDS, erase_wallet, take_in_order
from ciris_billing.ledger.rules import DEFAULT_PRIORITY, LotKind
from ciris_billing.ledger.wallet import Credit, NewLot, add_lot
from ciris_billing.pricing import Pricing


@dataclass(frozen=True, slots=True)
class Grant:
    account: Row[Any]
    uses: int
    kind: str
    lot_id: str | None = None


@dataclass(frozen=True, slots=True)
class LotTerms:
    """A grant's lot: its kind (`promotional`, or `paid` with a per-use cost basis), its
    priority and when it expires (None: never)."""

    kind: LotKind = "promotional"
    priority: int = DEFAULT_PRIORITY
    expires_at: datetime | None = None
    cost_basis_minor: int | None = None

    def lot(self, uses: int) -> NewLot:
        paid = self.kind == "paid" and self.cost_basis_minor is not None
        return NewLot(
            kind=self.kind,
            uses=uses,
            source="grant",
            priority=self.priority,
            expires_at=self.expires_at,
            amount_minor=(self.cost_basis_minor or 0) * uses if paid else 0,
        )


async def grant(
    conn: AsyncConnection,
    identity: Identity,
    uses: int,
    reason: str,
    pricing: Pricing,
    idempotency_key: str | None = None,
    *,
    api_key_id: str | None = None,
    terms: LotTerms = LotTerms(),
) -> Grant:
    """Add (grant) or remove (adjustment) paid uses, with the reason on the ledger row.

    A grant is a new promotional lot. An adjustment (uses < 0) takes from the account's
    promotional and paid lots in the consumption order (ledger/rules.py: priority, soonest
    expiry, promotional before paid, oldest), never from its free uses nor from lots expired
    now; AdjustmentBelowZero when they hold fewer."""
    account, _ = await ensure_account(conn, identity, pricing)
    if uses > 0:
        # A grant is a lot (ledger/wallet.py): the credits row, the lot, the wallet in order
        # and the counters, under the account's lock.
        kind = "grant"
        lot_id = await add_lot(
            conn,
            account.id,
            terms.lot(uses),
            Credit(
                kind=kind,
                currency=account.currency,
                description=reason,
                idempotency_key=idempotency_key,
                api_key_id=api_key_id,
            ),
        )
        granted = (
            await conn.execute(
                accounts.update()
                .where(accounts.c.id == account.id)
                .values(plan_name=plan_with_paid_uses())
                .returning(*accounts.c)
            )
        ).one()
        await record_available_change(conn, granted, uses)
        return Grant(await get_account(conn, identity), uses, kind, lot_id)
    # A negative adjustment takes from the promotional and paid lots (never the free uses), in
    # the consumption order, skipping lots expired now: one `adjustment` row naming them.
    # Safe: take_in_order locks the account's row (its wallet) first, and no lot can go below 0.
    found = await take_in_order(conn, account.id, -uses, PAID_KINDS, utcnow())
    if found is None:
        raise AdjustmentBelowZero(
            f"Removing {-uses} uses would take the paid balance "
            f"({account.paid_uses_remaining}) below zero"
        )
    wallet, take = found
    kind = "adjustment"
    changed = await moves.apply(
        conn,
        account.id,
        moves.Move(
            kind=kind,
            currency=account.currency,
            description=reason,
            idempotency_key=idempotency_key,
            api_key_id=api_key_id,
            lots=take,
        ),
        wallet=wallet,
    )
    await record_available_change(conn, changed, uses)
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


async def set_low_balance_threshold(
    conn: AsyncConnection, identity: Identity, uses: int | None
) -> tuple[Row[Any], int]:
    """The account's own balance.low threshold (None: LOW_BALANCE_THRESHOLD_USES again); the
    account and the threshold now in force. A change is no crossing: nothing is sent for it."""
    account = await get_account(conn, identity)
    await conn.execute(
        accounts.update()
        .where(accounts.c.id == account.id)
        .values(low_balance_threshold_uses=uses, updated_at=utcnow())
    )
    return await get_account(conn, identity), await threshold_of(conn, account.id)


async def _digest(conn: AsyncConnection, identity: Identity) -> str:
    key = await installation.erasure_key(conn)
    return erased_digest(key, identity.oauth_provider, identity.external_id)


async def find_including_erased(conn: AsyncConnection, identity: Identity) -> Row[Any]:
    """The identity's account: the live one, else the one erased last. After erasure the same
    identity may come back and get a new account: that one is "its account" from then on
    (export shows the new account's data; the erased ones hold no personal data to export)."""
    account = await find_account(conn, identity) or await _last_erased(conn, identity)
    if account is None:
        raise AccountNotFound(f"No account for {identity.oauth_provider} {identity.external_id}")
    return account


async def _last_erased(conn: AsyncConnection, identity: Identity) -> Row[Any] | None:
    result = await conn.execute(
        select(accounts)
        .where(accounts.c.oauth_provider == identity.oauth_provider)
        .where(accounts.c.erased_digest == await _digest(conn, identity))
        .order_by(accounts.c.erased_at.desc(), accounts.c.id)
        .limit(1)
    )
    return result.first()


ERASED_FIELDS = (
    "accounts.external_id",
    "accounts.customer_email",
    "accounts.display_name",
    "accounts.status_reason",
    "purchases.customer_email",
    "charges.description",
    "charges.metadata",
    "reservations.metadata",
    "personal data in stored idempotent responses",
    "personal data in outgoing events, credits' texts, the audit trail and stored provider events",
    "the saved card (detached at the payment provider)",
)

# Fields of a stored response that hold personal data (its key and fingerprint stay).
_PERSONAL = frozenset(
    {
        "external_id",
        "customer_email",
        "display_name",
        "status_reason",
        "reason",
        "description",
        "metadata",
    }
)


async def erase(conn: AsyncConnection, identity: Identity) -> Row[Any]:
    """Erase personal data; the ledger rows and every amount and count stay.

    Repeatable and idempotent: erasing an identity with no live account answers its last
    erased one, changing nothing; an identity that came back (a new account) can be erased
    again. The account keeps only a keyed digest of the identity (accounts/erasure.py).
    """
    account = await find_account(conn, identity)
    if account is None:
        return await find_including_erased(conn, identity)
    now = utcnow()
    # Safe when two erasures of one account race: the second UPDATE waits for the first's
    # row lock, then writes the same values again (the digest and external id depend only on
    # the account and identity); the scrubbing below is idempotent too.
    await conn.execute(
        accounts.update()
        .where(accounts.c.id == account.id)
        .values(
            external_id=erased_external_id(account.id),
            erased_digest=await _digest(conn, identity),
            customer_email=None,
            display_name=None,
            status_reason=None,
            erased_at=now,
            updated_at=now,
        )
    )
    # The account's uses are written off (a `void` row naming each lot), its wallet emptied
    # but for lots open holds name (ledger/moves.py erase_wallet).
    await erase_wallet(conn, account.id, account.currency)
    await conn.execute(
        purchases.update().where(purchases.c.account_id == account.id).values(customer_email=None)
    )
    await conn.execute(
        charges.update()
        .where(charges.c.account_id == account.id)
        .values(description=None, metadata={})
    )
    # A hold's metadata would otherwise be shown, copied into its capture's charge, or sent
    # in its reservation.expired event after the erasure.
    await conn.execute(
        reservations.update().where(reservations.c.account_id == account.id).values(metadata={})
    )
    personal = {identity.external_id, *([account.customer_email] if account.customer_email else [])}
    await _scrub_stored_responses(conn, account.id, identity, account.customer_email)
    await _scrub_events(conn, account.id, identity, account.customer_email)
    await _scrub_texts(conn, account.id, personal)
    await cards.forget_on_erasure(conn, account.id)
    return (await conn.execute(select(accounts).where(accounts.c.id == account.id))).one()


async def _scrub_stored_responses(
    conn: AsyncConnection, account_id: str, identity: Identity, email: str | None
) -> None:
    """Stored responses that quote the account lose its personal data, but the records stay:
    their key and fingerprint keep refusing (409) or replaying a retried request, so a request
    made before the erasure is never applied a second time."""
    personal = {identity.external_id, *([email] if email else [])}
    rows = await conn.execute(
        select(idempotency_keys.c.key, idempotency_keys.c.response_body).where(
            idempotency_keys.c.response_body.contains(f'"account_id":"{account_id}"')
        )
    )
    for row in rows.all():
        try:
            body = json.loads(row.response_body)
        except ValueError:
            body = None
        scrubbed = json.dumps(_scrub(body, personal), separators=(",", ":"))
        # By key and body: the row read above, whatever else shares its key string.
        await conn.execute(
            idempotency_keys.update()
            .where(
                idempotency_keys.c.key == row.key,
                idempotency_keys.c.response_body == row.response_body,
            )
            .values(response_body=scrubbed)
        )


async def _scrub_events(
    conn: AsyncConnection, account_id: str, identity: Identity, email: str | None
) -> None:
    """The account's events in the outbox lose its personal data (their identity names the
    erased account from now on); deliveries still due send them so. Those already delivered
    are the receiver's to erase."""
    personal = {identity.external_id, *([email] if email else [])}
    rows = await conn.execute(
        select(events.c.id, events.c.data).where(events.c.account_id == account_id)
    )
    for row in rows.all():
        data = _scrub(dict(row.data), personal)
        if "external_id" in data:
            data["external_id"] = erased_external_id(account_id)
        await conn.execute(events.update().where(events.c.id == row.id).values(data=data))


async def _scrub_texts(conn: AsyncConnection, account_id: str, personal: set[str]) -> None:
    """The rest of what may quote the person: credits' texts (a grant's reason), the audit
    trail's details, and the stored provider events of the account's payments (a receipt
    email). Only the values quoting the identity or email go; amounts, ids and keys stay."""
    for row in await conn.execute(
        select(credits.c.id, credits.c.description).where(
            credits.c.account_id == account_id, credits.c.description.is_not(None)
        )
    ):
        if _quotes(row.description, personal):
            await conn.execute(
                credits.update().where(credits.c.id == row.id).values(description=None)
            )
    for entry in await conn.execute(
        select(
            audit_trail.c.id, audit_trail.c.detail, audit_trail.c.before, audit_trail.c.after
        ).where(audit_trail.c.account_id == account_id)
    ):
        await conn.execute(
            audit_trail.update()
            .where(audit_trail.c.id == entry.id)
            .values(
                detail=_scrub_values(entry.detail, personal),
                before=_scrub_values(entry.before, personal),
                after=_scrub_values(entry.after, personal),
            )
        )
    paid = select(purchases.c.payment_id).where(purchases.c.account_id == account_id)
    for row in await conn.execute(
        select(webhook_events.c.id, webhook_events.c.payload).where(
            webhook_events.c.payment_id.in_(paid)
        )
    ):
        if not _quotes(row.payload, personal):
            continue
        try:
            payload = json.dumps(_scrub_values(json.loads(row.payload), personal))
        except ValueError:
            payload = "{}"
        await conn.execute(
            webhook_events.update().where(webhook_events.c.id == row.id).values(payload=payload)
        )


def _quotes(value: str, personal: set[str]) -> bool:
    return any(value == part or (len(part) >= 5 and part in value) for part in personal)


def _scrub_values(value: Any, personal: set[str]) -> Any:
    """`value` with every string quoting the identity or email replaced by None (its keys,
    and every other value, as they were: a stored provider event still parses)."""
    if isinstance(value, dict):
        return {key: _scrub_values(item, personal) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub_values(item, personal) for item in value]
    if isinstance(value, str) and _quotes(value, personal):
        return None
    return value


def _scrub(value: Any, personal: set[str]) -> Any:
    if isinstance(value, dict):
        return {
            key: None if key in _PERSONAL else _scrub(item, personal) for key, item in value.items()
        }
    if isinstance(value, list):
        return [_scrub(item, personal) for item in value]
    if isinstance(value, str) and _quotes(value, personal):
        return None  # the identity or email, or a URL or text quoting it
    return value


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
        "reservations": await rows(reservations, reservations.c.created_at),
        "lots": await rows(lots, lots.c.created_at),
    }


def _jsonable(mapping: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dict(mapping).items():
        if key == "last_charge_free_uses":
            continue
        out[key] = iso(value) if hasattr(value, "isoformat") else value
    return out
