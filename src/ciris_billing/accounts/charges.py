"""Charges: spend uses, free ones first, and write the ledger row — once per idempotency key.

On PostgreSQL a charge is ONE statement (an UPDATE feeding an INSERT through a CTE) sent
straight to the driver outside any explicit transaction: one round trip, atomic by itself, and
the account row is locked only for that statement; charges that queue up together go out as one
such statement (charge_writer.py). Elsewhere (SQLite) the same UPDATE and INSERT run in one
transaction. Either way:
- the UPDATE re-checks the balance on the locked row, so no use is ever spent twice and no
  counter goes below zero (no read-modify-write in Python);
- the charge's idempotency key is unique on `charges`, so of two requests with one key only one
  can commit; the other fails as a whole and is answered from the row that did commit.
Anything but success (unknown account, no use left, suspended, a retried key) takes the slow
path, `_after_refusal`, which finds out which it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing import idempotency
from ciris_billing.accounts.charge_writer import ChargeWriter
from ciris_billing.accounts.service import NO_USES_LEFT, Identity, ensure_account, identity_clause
from ciris_billing.db import DuplicateKey, accounts, charges, iso, new_id, utcnow
from ciris_billing.errors import AccountSuspended, IdempotencyKeyReused, PurchaseRequired
from ciris_billing.pricing import Pricing

CHARGES_PATH = "/v1/billing/charges"


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    uses: int
    amount_minor: int
    currency: str
    description: str | None
    metadata: dict[str, Any]
    idempotency_key: str | None

    def fingerprint(self, identity: Identity) -> str:
        """What makes a retry "the same request" (the generic idempotency fingerprint)."""
        payload = {
            "oauth_provider": identity.oauth_provider,
            "external_id": identity.external_id,
            "uses": self.uses,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
            "description": self.description,
            "metadata": self.metadata,
        }
        return idempotency.fingerprint("POST", CHARGES_PATH, payload)


@dataclass(frozen=True, slots=True)
class Charge:
    charge_id: str
    account_id: str
    uses: int
    free_uses_used: int
    paid_uses_used: int
    amount_minor: int
    currency: str
    description: str | None
    metadata: dict[str, Any]
    free_uses_remaining: int
    credits_remaining: int
    total_uses: int
    plan_name: str
    created_at: str
    replayed: bool = False


async def charge(
    engine: AsyncEngine,
    writer: ChargeWriter | None,
    identity: Identity,
    request: ChargeRequest,
    pricing: Pricing,
) -> Charge:
    """Spend `request.uses` and record the charge, or raise 402 / 403 / 409. `writer` sends
    charges on PostgreSQL (None on SQLite)."""
    for _attempt in range(3):
        charge_id, now = new_id("ch"), utcnow()
        fingerprint = request.fingerprint(identity) if request.idempotency_key else None
        if writer is not None:
            done = await _one_statement(writer, identity, request, charge_id, fingerprint, now)
        else:
            done = await _in_transaction(engine, identity, request, charge_id, fingerprint, now)
        if done is not None:
            return done
        outcome = await _after_refusal(engine, identity, request, fingerprint, pricing)
        if isinstance(outcome, Charge):
            return outcome
    # Three rounds of "the account appeared / changed under us": answer from what it holds now.
    return await _refuse(engine, identity, request, pricing)


async def _one_statement(
    writer: ChargeWriter,
    identity: Identity,
    request: ChargeRequest,
    charge_id: str,
    fingerprint: str | None,
    now: datetime,
) -> Charge | None:
    try:
        row = await writer.charge(
            identity.oauth_provider,
            identity.external_id,
            request.uses,
            request.idempotency_key,
            charge_id,
            request.amount_minor,
            request.currency,
            request.description,
            json.dumps(request.metadata, separators=(",", ":")),
            fingerprint,
            now,
        )
    except DuplicateKey:
        return None  # a retried key: answered from the row that committed
    return None if row is None else _charge(charge_id, request, row, now)


async def _in_transaction(
    engine: AsyncEngine,
    identity: Identity,
    request: ChargeRequest,
    charge_id: str,
    fingerprint: str | None,
    now: datetime,
) -> Charge | None:
    free, paid = accounts.c.free_uses_remaining, accounts.c.paid_uses_remaining
    enough_free = free >= request.uses
    try:
        async with engine.begin() as conn:
            if request.idempotency_key is not None and await _key_seen(conn, request):
                return None
            spent = (
                await conn.execute(
                    accounts.update()
                    .where(
                        identity_clause(identity),
                        accounts.c.status == "active",
                        free + paid >= request.uses,
                    )
                    .values(
                        last_charge_free_uses=case((enough_free, request.uses), else_=free),
                        free_uses_remaining=case((enough_free, free - request.uses), else_=0),
                        paid_uses_remaining=case(
                            (enough_free, paid), else_=paid - (request.uses - free)
                        ),
                        total_uses=accounts.c.total_uses + request.uses,
                        updated_at=now,
                    )
                    .returning(
                        accounts.c.id,
                        free,
                        paid,
                        accounts.c.total_uses,
                        accounts.c.last_charge_free_uses,
                        accounts.c.plan_name,
                    )
                )
            ).first()
            if spent is None:
                return None
            free_used = int(spent.last_charge_free_uses)
            await conn.execute(
                charges.insert().values(
                    id=charge_id,
                    account_id=spent.id,
                    uses=request.uses,
                    free_uses_used=free_used,
                    paid_uses_used=request.uses - free_used,
                    amount_minor=request.amount_minor,
                    currency=request.currency,
                    description=request.description,
                    metadata=request.metadata,
                    idempotency_key=request.idempotency_key,
                    request_fingerprint=fingerprint,
                    free_uses_after=spent.free_uses_remaining,
                    paid_uses_after=spent.paid_uses_remaining,
                    total_uses_after=spent.total_uses,
                    created_at=now,
                )
            )
    except IntegrityError:
        return None  # the same key committed first: answered from its row
    return _charge(charge_id, request, spent._mapping, now)


async def _key_seen(conn: AsyncConnection, request: ChargeRequest) -> bool:
    found = await conn.scalar(
        select(charges.c.id).where(charges.c.idempotency_key == request.idempotency_key)
    )
    return found is not None or await idempotency.key_exists(conn, request.idempotency_key or "")


async def _after_refusal(
    engine: AsyncEngine,
    identity: Identity,
    request: ChargeRequest,
    fingerprint: str | None,
    pricing: Pricing,
) -> Charge | str:
    """Why the charge did not happen: a retried key (replay; 409 if another request), an
    account that is new or changed meanwhile ("retry"), suspended (403) or empty (402)."""
    async with engine.begin() as conn:
        if request.idempotency_key is not None and fingerprint is not None:
            earlier = await _earlier_charge(conn, identity, request, fingerprint)
            if earlier is not None:
                return earlier
        account, created = await ensure_account(conn, identity, pricing)
    enough = int(account.free_uses_remaining) + int(account.paid_uses_remaining) >= request.uses
    if created or (account.status == "active" and enough):
        return "retry"  # a new account, or one created or topped up concurrently: try again
    raise _refusal(account, request, pricing)


async def _refuse(
    engine: AsyncEngine, identity: Identity, request: ChargeRequest, pricing: Pricing
) -> Charge:
    async with engine.begin() as conn:
        account, _ = await ensure_account(conn, identity, pricing)
    raise _refusal(account, request, pricing)


def _refusal(account: Any, request: ChargeRequest, pricing: Pricing) -> Exception:
    if account.status != "active":
        return AccountSuspended("This account is suspended; charges are refused")
    return PurchaseRequired(
        NO_USES_LEFT,
        purchase_required=True,
        purchase_price_minor=pricing.price_per_purchase_minor,
        purchase_uses=pricing.paid_uses_per_purchase,
        currency=pricing.currency,
        free_uses_remaining=int(account.free_uses_remaining),
        credits_remaining=int(account.paid_uses_remaining),
        uses_requested=request.uses,
    )


async def _earlier_charge(
    conn: AsyncConnection, identity: Identity, request: ChargeRequest, fingerprint: str
) -> Charge | None:
    key = request.idempotency_key or ""
    row = (
        await conn.execute(
            select(charges, accounts.c.plan_name)
            .join(accounts, accounts.c.id == charges.c.account_id)
            .where(charges.c.idempotency_key == key)
        )
    ).first()
    if row is None:
        # A key used on another kind of request is a conflict (lookup raises 409). A charge
        # with this key committing meanwhile is not: the retry will find and replay it.
        await idempotency.lookup(conn, key, fingerprint, charges_too=False)
        return None
    if row.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request; "
            "use a new key for a new request"
        )
    return Charge(
        charge_id=row.id,
        account_id=row.account_id,
        uses=int(row.uses),
        free_uses_used=int(row.free_uses_used),
        paid_uses_used=int(row.paid_uses_used),
        amount_minor=int(row.amount_minor),
        currency=row.currency,
        description=row.description,
        metadata=dict(row.metadata),
        free_uses_remaining=int(row.free_uses_after),
        credits_remaining=int(row.paid_uses_after),
        total_uses=int(row.total_uses_after),
        plan_name=row.plan_name,
        created_at=iso(row.created_at),
        replayed=True,
    )


def _charge(charge_id: str, request: ChargeRequest, spent: Any, now: datetime) -> Charge:
    free_used = int(spent["last_charge_free_uses"])
    return Charge(
        charge_id=charge_id,
        account_id=spent["id"],
        uses=request.uses,
        free_uses_used=free_used,
        paid_uses_used=request.uses - free_used,
        amount_minor=request.amount_minor,
        currency=request.currency,
        description=request.description,
        metadata=request.metadata,
        free_uses_remaining=int(spent["free_uses_remaining"]),
        credits_remaining=int(spent["paid_uses_remaining"]),
        total_uses=int(spent["total_uses"]),
        plan_name=spent["plan_name"],
        created_at=iso(now),
    )
