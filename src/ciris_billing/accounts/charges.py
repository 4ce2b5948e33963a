"""Charges: spend uses, free ones first, and write the ledger row — once per idempotency key.

A charge is its own unit of work: ONE statement (an UPDATE feeding an INSERT through a CTE,
hot/writer.py) sent through the charge store outside any explicit transaction — one round trip,
atomic by itself, the account row locked only for that statement; charges that queue up
together go out as one such statement. So:
- the UPDATE re-checks the balance on the locked row, so no use is ever spent twice and no
  counter goes below zero (no read-modify-write in Python);
- the charge's idempotency key is unique on `charges` per API key, so of two requests with one
  key from one API key only one can commit; the other is answered from the row that did commit
  (idempotency.py). Another API key's request with the same key is another charge.
- the UPDATE's WHERE also requires the account's currency, so a charge in another currency
  changes nothing (422 from the slow path; SPEC.md) at no extra round trip when it succeeds.
Anything but success (unknown account, no use left, suspended, another currency, a retried key)
takes the slow path, `_after_refusal`, which finds out which it was in a unit of work of its
own. A charge that names no currency is in the account's: sent first in the default currency
(the pricing's, most accounts'), it is sent again in the account's when that differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing import idempotency
from ciris_billing.accounts.checks import CreditStatus, credit_status, open_account
from ciris_billing.accounts.hot.writer import ChargeAttempt, ChargeStore
from ciris_billing.accounts.service import Identity, ensure_account, purchase_required
from ciris_billing.db import accounts, charges, iso, new_id, utcnow
from ciris_billing.errors import AccountSuspended, CurrencyMismatch
from ciris_billing.ledger import free_periods
from ciris_billing.ledger.balance import usable, with_usable
from ciris_billing.pricing import Pricing
from ciris_billing.rates.service import Rate
from ciris_billing.unit_of_work import unit_of_work


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    """A validated charge. `fingerprint` (with a key) is computed at the edge (answers.py);
    `api_key_id` is the authenticated API key's, the idempotency key's scope."""

    identity: Identity
    uses: int
    amount_minor: int
    currency: str
    description: str | None
    metadata: dict[str, Any]
    idempotency_key: str | None
    fingerprint: str | None
    api_key_id: str
    # False: the request named no currency, so `currency` is a default and the account's wins.
    currency_named: bool = True
    # A rated charge: its feature's rate and the quantity (`uses`: an `up` charge's, rounded
    # up; a `carry` charge's at most, what the account's carry makes is decided in SQL).
    rate: Rate | None = None
    quantity: int | None = None

    def uses_for(self, account: Any) -> int:
        """The uses this charge takes from `account` now (a `carry` charge: with its carry)."""
        if self.rate is None or self.rate.rounding != "carry" or self.quantity is None:
            return self.uses
        carried = dict(zip(account.carry_features, account.carry_left, strict=True))
        return (int(carried.get(self.rate.feature, 0)) + self.quantity) // self.rate.units_per_use


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
    # The lots it drew from, in the order it took them: [{"lot_id", "uses"}].
    lots: list[dict[str, Any]] = field(default_factory=list)
    replayed: bool = False
    feature: str | None = None
    quantity: int | None = None
    # What a credit check would answer right after this charge (None for a replay): the answer
    # carries it so an agent can skip its next check.
    next_check: CreditStatus | None = None


class _Next(Enum):
    """What the slow path says when it neither replays nor refuses."""

    TRY_AGAIN = "try_again"  # a new account, or one created or topped up concurrently


async def charge(
    request: ChargeRequest,
    *,
    store: ChargeStore,
    engine: AsyncEngine,
    pricing: Pricing,
    at: datetime | None = None,
) -> Charge:
    """Spend `request.uses` and record the charge (or replay the one made under its key), or
    raise 402 / 403 / 409. `at`: the charge's time (default: now)."""
    metadata_json = json.dumps(request.metadata, separators=(",", ":"))
    for _attempt in range(3):
        attempt = ChargeAttempt(
            oauth_provider=request.identity.oauth_provider,
            external_id=request.identity.external_id,
            uses=request.uses,
            amount_minor=request.amount_minor,
            currency=request.currency,
            description=request.description,
            metadata_json=metadata_json,
            idempotency_key=request.idempotency_key,
            fingerprint=request.fingerprint,
            charge_id=new_id("ch"),
            at=at or utcnow(),
            api_key_id=request.api_key_id,
            rated=None if request.rate is None else request.rate.rounding,
            feature=None if request.rate is None else request.rate.feature,
            quantity=request.quantity,
            units_per_use=None if request.rate is None else request.rate.units_per_use,
        )
        spent = await store.charge(attempt)
        if spent is not None:
            return _charge(attempt, request, spent, pricing)
        outcome = await _after_refusal(engine, request, pricing, attempt.at)
        if isinstance(outcome, Charge):
            return outcome
        if isinstance(outcome, ChargeRequest):
            request = outcome  # the same charge, in the account's currency
    # Three rounds of "the account appeared / changed under us": answer from what it holds now.
    account, _ = await open_account(engine, request.identity, pricing)
    raise _refusal(account, request, pricing, at or utcnow())


async def _after_refusal(
    engine: AsyncEngine, request: ChargeRequest, pricing: Pricing, now: datetime
) -> Charge | ChargeRequest | _Next:
    """Why the charge was not made: a retried key (replay; 409 if another request), another
    currency than the account's (422; or, when the request named none, try again in the
    account's), an account that is new or changed meanwhile (try again), suspended (403) or
    empty (402)."""
    # Its own unit of work: the retry runs on the store's connections, which must see the
    # account this may open (committed when the block ends).
    async with unit_of_work(engine) as work:
        conn = await work.connection()
        if request.idempotency_key is not None and request.fingerprint is not None:
            earlier = await idempotency.earlier_charge(
                conn, request.api_key_id, request.idempotency_key, request.fingerprint
            )
            if earlier is not None:
                return await _replay(conn, earlier.charge_id)
            # No use of the key yet: a charge with it committing meanwhile is not a conflict,
            # the next attempt's statement fails on the unique key and finds it here.
        account, created = await ensure_account(conn, request.identity, pricing)
        # Monthly free uses: the month's first charge adds its free lot (once: free_periods),
        # then is sent again.
        renewed = free_periods.is_due(account.free_period, now, pricing) and (
            await free_periods.renew(conn, account.id, account.currency, now, pricing)
        )
    if account.currency != request.currency:
        if not request.currency_named:
            # An account's currency never changes, so the retry cannot loop on this.
            return replace(request, currency=account.currency)
        raise _refusal(account, request, pricing, now)
    enough = usable(account, now).total >= request.uses_for(account)
    if created or renewed or (account.status == "active" and enough):
        return _Next.TRY_AGAIN
    raise _refusal(account, request, pricing, now)


def _refusal(account: Any, request: ChargeRequest, pricing: Pricing, now: datetime) -> Exception:
    if account.currency != request.currency:
        return CurrencyMismatch(
            f"This charge is in {request.currency} but the account is in {account.currency}: "
            f"charge in {account.currency}, or omit currency",
            currency=request.currency,
            account_currency=account.currency,
        )
    if account.status != "active":
        return AccountSuspended("This account is suspended; charges are refused")
    # What it can give now: a lot expired and not yet swept by the job is not counted.
    return purchase_required(with_usable(account, now), request.uses_for(account), pricing)


async def _replay(conn: AsyncConnection, charge_id: str) -> Charge:
    """The charge made earlier under the request's key, as it was answered then."""
    row = (
        await conn.execute(
            select(charges, accounts.c.plan_name)
            .join(accounts, accounts.c.id == charges.c.account_id)
            .where(charges.c.id == charge_id)
        )
    ).one()
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
        lots=_lots(row.lot_ids, row.lot_uses),
        replayed=True,
        feature=row.feature,
        quantity=None if row.quantity is None else int(row.quantity),
    )


def _charge(attempt: ChargeAttempt, request: ChargeRequest, spent: Any, pricing: Pricing) -> Charge:
    free_used = int(spent["last_charge_free_uses"])
    # A rated text returns the uses it took (a `carry` charge's are decided by its statement).
    uses = request.uses if attempt.rated is None else int(spent["uses"])
    return Charge(
        charge_id=attempt.charge_id,
        account_id=spent["id"],
        uses=uses,
        free_uses_used=free_used,
        paid_uses_used=uses - free_used,
        amount_minor=request.amount_minor,
        currency=request.currency,
        description=request.description,
        metadata=request.metadata,
        free_uses_remaining=int(spent["free_uses_remaining"]),
        credits_remaining=int(spent["paid_uses_remaining"]),
        total_uses=int(spent["total_uses"]),
        plan_name=spent["plan_name"],
        created_at=iso(attempt.at),
        lots=_lots(spent["lot_ids"], spent["lot_uses"]),
        feature=attempt.feature,
        quantity=attempt.quantity,
        next_check=credit_status(_as_checked(spent), pricing, attempt.at),
    )


def _as_checked(spent: Any) -> dict[str, Any]:
    """The charge statement's row as a check reads the account (reader.py): the statement made
    the charge, so the account is active; its counters are what it can give at the charge's
    time (usable_columns), the wallet is there when something in it expires."""
    return {
        "status": "active",
        "status_reason": None,
        "plan_name": spent["plan_name"],
        "free_uses_remaining": spent["free_uses_remaining"],
        "paid_uses_remaining": spent["paid_uses_remaining"],
        "total_uses": spent["total_uses"],
        "reserved_free_uses": spent["reserved_free_uses"],
        "reserved_paid_uses": spent["reserved_paid_uses"],
        "next_expiry_at": spent["next_expiry_at"],
        "lot_left": spent["wallet_left"],
        "lot_kinds": spent["wallet_kinds"],
        "lot_expires": spent["wallet_expires"],
    }


def _lots(lot_ids: list[str] | None, lot_uses: list[int] | None) -> list[dict[str, Any]]:
    """A charge's lots as its answer names them (none for charges made before lots)."""
    return [
        {"lot_id": lot_id, "uses": int(uses)}
        for lot_id, uses in zip(lot_ids or [], lot_uses or [], strict=True)
    ]
