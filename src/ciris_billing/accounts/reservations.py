"""Reservations (holds): uses set aside for an interaction whose cost is known only at its end.

A hold takes its uses OUT of the account's lots (by the consumption rule) into
`reserved_free_uses` / `reserved_paid_uses`, and the reservation row remembers the lots and
the split. So the charge statement, refunds, disputes and grants need no change: what they can
take is what is left outside the holds. Capture turns the hold into one charge row (spent from
the hold's lots in its order) and gives back the rest; release and expiry give all of it back,
each use to the lot it came from. The balances are written by the money core (ledger/holds.py;
the hot twins: ledger/statements.py, ledger/capture_statements.py).

Every transition (held -> captured | released | expired) is ONE conditional UPDATE of the
reservation `WHERE status = 'held'`: of any two racing transitions exactly one updates the row,
the other sees no row and answers from the winner's. The account's counters are changed in the
same transaction, after the reservation's row (lock order: reservation, then account; a hold
locks only its account, the only row it reads before inserting its new reservation).

Functions here take an open connection inside the caller's transaction and never commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.accounts.service import Identity, identity_clause, purchase_required
from ciris_billing.db import accounts, iso, new_id, reservations, utcnow
from ciris_billing.errors import (
    AccountNotFound,
    AccountSuspended,
    InvalidRequest,
    ReservationExpired,
    ReservationNotFound,
    ReservationNotHeld,
)
from ciris_billing.events.outbox import RESERVATION_EXPIRED, record_available_change, record_event
from ciris_billing.ledger import carry, free_periods
from ciris_billing.ledger import holds as ledger_holds
from ciris_billing.ledger.balance import with_usable
from ciris_billing.payments import disputes
from ciris_billing.pricing import Pricing

HELD = "held"


@dataclass(frozen=True, slots=True)
class HoldRequest:
    identity: Identity
    uses: int
    ttl_seconds: int
    metadata: dict[str, Any]
    api_key_id: str
    idempotency_key: str | None = None
    # A hold by a feature with a `carry` rate: `uses` is what its quantity can complete
    # whatever the account carries (ceil(quantity / units_per_use)); the capture applies it.
    carry: CarryRate | None = None


@dataclass(frozen=True, slots=True)
class CarryRate:
    """A `carry` hold's feature, quantity held and the rate's units per use."""

    feature: str
    quantity: int
    units_per_use: int


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    reservation_id: str
    uses: int | None  # None: all the held uses
    amount_minor: int
    description: str | None
    metadata: dict[str, Any]
    api_key_id: str
    # A `carry` hold's capture: the units the interaction used (None: the held quantity).
    quantity: int | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """A reservation and its account as they are after a step (`charge`: the captured one)."""

    reservation: Row[Any]
    account: Row[Any]
    charge: Row[Any] | None = None
    changed: bool = True  # False: a release of a hold already released or expired


def held_uses(account: Any) -> int:
    """Uses held by active reservations on this account (a row or a record)."""
    return int(account["reserved_free_uses"]) + int(account["reserved_paid_uses"])


async def hold(conn: AsyncConnection, request: HoldRequest, pricing: Pricing) -> Outcome:
    """Hold `request.uses` of the identity's account (which must exist) from its lots by the
    consumption rule, or raise 402 (not enough available) / 403 (suspended)."""
    now = utcnow()
    # Safe: the account's row is locked until the transaction ends, so what it holds read here
    # is what the hold's UPDATE below takes from (no concurrent hold or charge in between).
    account = (
        await conn.execute(
            select(accounts).where(identity_clause(request.identity)).with_for_update()
        )
    ).first()
    if account is None:
        raise AccountNotFound(
            f"No account for {request.identity.oauth_provider} {request.identity.external_id}"
        )
    if account.status != "active":
        raise AccountSuspended("This account is suspended; new holds are refused")
    if free_periods.is_due(account.free_period, now, pricing):
        await free_periods.renew(conn, account.id, account.currency, now, pricing)
    taken = await ledger_holds.take(conn, account.id, request.uses, now)
    if taken is None:
        raise purchase_required(
            with_usable(await _account(conn, account.id), now), request.uses, pricing
        )
    account = await _account(conn, account.id)
    reservation = (
        await conn.execute(
            reservations.insert()
            .values(
                id=new_id("rsv"),
                account_id=account.id,
                api_key_id=request.api_key_id,
                status=HELD,
                uses=request.uses,
                free_uses_held=taken.free,
                paid_uses_held=request.uses - taken.free,
                expires_at=now + timedelta(seconds=request.ttl_seconds),
                metadata=request.metadata,
                idempotency_key=request.idempotency_key,
                lot_ids=taken.lot_ids,
                lot_kinds=taken.lot_kinds,
                lot_uses=taken.lot_uses,
                feature=None if request.carry is None else request.carry.feature,
                quantity=None if request.carry is None else request.carry.quantity,
                units_per_use=None if request.carry is None else request.carry.units_per_use,
                created_at=now,
                updated_at=now,
            )
            .returning(*reservations.c)
        )
    ).one()
    # The hold took its uses out of the available ones: a crossing is reported with it.
    await record_available_change(conn, account, -request.uses)
    return Outcome(reservation, account)


async def capture(conn: AsyncConnection, request: CaptureRequest) -> Outcome:
    """Charge `request.uses` (all when None) of an active hold as one charge row, spent from
    the hold's lots in its order (a lot that expired since included: a hold is a promise), and
    give the rest back to its lots; 409 when it is expired (by the clock, whatever the job's
    delay) or no longer held; 422 for more than was held."""
    now = utcnow()
    charge_id = new_id("ch")
    wanted = request.uses if request.uses is not None else reservations.c.uses
    # A `carry` hold is captured by quantity (at most the held one), a hold of uses by uses.
    # (Only a `carry` hold has a quantity: NULL >= q is not true.)
    by_quantity = []
    if request.quantity is not None:
        by_quantity = [reservations.c.quantity >= request.quantity]
    elif request.uses is not None:
        by_quantity = [reservations.c.units_per_use.is_(None)]
    # Safe: exactly once. Of racing captures / releases / expiries, only one finds status
    # 'held' (the row lock makes the others re-check and see the winner's status).
    won = (
        await conn.execute(
            reservations.update()
            .where(
                reservations.c.id == request.reservation_id,
                reservations.c.status == HELD,
                reservations.c.expires_at > now,
                reservations.c.uses >= wanted,
                *by_quantity,
            )
            .values(
                status="captured",
                captured_uses=wanted,
                charge_id=charge_id,
                updated_at=now,
                closed_at=now,
            )
            .returning(*reservations.c)
        )
    ).first()
    if won is None:
        raise await _why_not(conn, request.reservation_id, now, request, capturing=True)
    quantity = None
    if won.units_per_use is not None:
        quantity = int(won.quantity) if request.quantity is None else request.quantity
        won = await _carry_captured(conn, won, quantity)
    uses = int(won.captured_uses)
    taken, back = ledger_holds.consume(won.lot_uses, uses)
    free_used = sum(t for t, kind in zip(taken, won.lot_kinds, strict=True) if kind == 0)
    account = await ledger_holds.end_holds(
        conn,
        won.account_id,
        [ledger_holds.Ending(won, back)],
        now=now,
        why=won.id,
        spent=uses,
        to_disputes=disputes.hold_owed_uses,
    )
    charge = await ledger_holds.write_capture(
        conn,
        won,
        account,
        taken,
        charge_id=charge_id,
        free_used=free_used,
        amount_minor=request.amount_minor,
        description=request.description,
        metadata={**dict(won._mapping["metadata"]), **request.metadata},
        api_key_id=request.api_key_id,
        at=now,
        feature=won.feature,
        quantity=quantity,
    )
    return Outcome(won, account, charge)


async def _carry_captured(conn: AsyncConnection, won: Row[Any], quantity: int) -> Row[Any]:
    """A `carry` hold captured by `quantity`: the uses the account's carried remainder of the
    feature and `quantity` complete (ledger/carry.py) become the captured uses. The hold held
    ceil(its quantity / units) uses and a remainder is below one use, so they never exceed
    the held uses."""
    completed = await carry.take_carried(
        conn, won.account_id, won.feature, quantity, int(won.units_per_use)
    )
    if completed > int(won.uses):  # by construction never (see above)
        raise InvalidRequest(f"quantity: completes {completed} uses, {int(won.uses)} held")
    return (
        await conn.execute(
            reservations.update()
            .where(reservations.c.id == won.id)
            .values(captured_uses=completed)
            .returning(*reservations.c)
        )
    ).one()


async def release(conn: AsyncConnection, reservation_id: str) -> Outcome:
    """Give all the held uses back. Idempotent: a hold already released (or expired) is
    answered as it is; a captured one is 409."""
    now = utcnow()
    # Safe: exactly once, as capture (the conditional UPDATE on status 'held').
    won = (
        await conn.execute(
            reservations.update()
            .where(reservations.c.id == reservation_id, reservations.c.status == HELD)
            .values(status="released", updated_at=now, closed_at=now)
            .returning(*reservations.c)
        )
    ).first()
    if won is None:
        current = await _find(conn, reservation_id)
        if current is None:
            raise ReservationNotFound(f"No reservation {reservation_id}")
        if current.status == "captured":
            raise ReservationNotHeld(
                "This reservation was captured; it cannot be released", status=current.status
            )
        account = (
            await conn.execute(select(accounts).where(accounts.c.id == current.account_id))
        ).one()
        return Outcome(current, account, changed=False)
    account = await _give_back(conn, won.account_id, [won], now)
    return Outcome(won, account)


async def expire_account(conn: AsyncConnection, account_id: str, now: datetime) -> list[Row[Any]]:
    """Expire this account's holds past their expires_at (the job: jobs.py); the expired rows."""
    due = (
        reservations.c.account_id == account_id,
        reservations.c.status == HELD,
        reservations.c.expires_at <= now,
    )
    # The holds locked by id before the UPDATE (then the account, in _give_back): a dispute
    # opening's order (payments/disputes.py _hold); an UPDATE alone locks in scan order, and
    # racing a dispute on the account the two deadlocked (issue 21 finding 2).
    locked = (
        await conn.execute(
            select(reservations.c.id).where(*due).order_by(reservations.c.id).with_for_update()
        )
    ).scalars()
    # Safe: exactly once, as capture: a hold captured or released meanwhile is not 'held'.
    expired = list(
        await conn.execute(
            reservations.update()
            .where(reservations.c.id.in_(list(locked)), *due)
            .values(status="expired", updated_at=now, closed_at=now)
            .returning(*reservations.c)
        )
    )
    if expired:
        await _give_back(conn, account_id, expired, now)
        # Once per hold: only the UPDATE that moved it from 'held' returned it.
        for held in expired:
            await record_event(
                conn,
                account_id,
                RESERVATION_EXPIRED,
                {
                    "reservation_id": held.id,
                    "uses": int(held.uses),
                    "expires_at": iso(held.expires_at),
                    "metadata": dict(held._mapping["metadata"]),
                },
            )
    return expired


async def accounts_with_expired_holds(
    conn: AsyncConnection, now: datetime, limit: int
) -> list[str]:
    """Accounts that have holds past their expires_at (the partial index on held holds)."""
    rows = await conn.execute(
        select(reservations.c.account_id)
        .where(reservations.c.status == HELD, reservations.c.expires_at <= now)
        .group_by(reservations.c.account_id)
        .order_by(reservations.c.account_id)
        .limit(limit)
    )
    return [row.account_id for row in rows]


async def _give_back(
    conn: AsyncConnection, account_id: str, held: list[Row[Any]], now: datetime
) -> Row[Any]:
    """Ending holds give all their uses back, each to the lot it came from (ledger/holds.py)."""
    why = ", ".join(r.id for r in held)
    ending = [ledger_holds.Ending(r, [int(u) for u in r.lot_uses]) for r in held]
    return await ledger_holds.end_holds(
        conn, account_id, ending, now=now, why=why, to_disputes=disputes.hold_owed_uses
    )


async def _account(conn: AsyncConnection, account_id: str) -> Row[Any]:
    return (await conn.execute(select(accounts).where(accounts.c.id == account_id))).one()


async def _find(conn: AsyncConnection, reservation_id: str) -> Row[Any] | None:
    return (
        await conn.execute(select(reservations).where(reservations.c.id == reservation_id))
    ).first()


async def _why_not(
    conn: AsyncConnection,
    reservation_id: str,
    now: datetime,
    capture: CaptureRequest | None,
    *,
    capturing: bool,
) -> Exception:
    current = await _find(conn, reservation_id)
    if current is None:
        return ReservationNotFound(f"No reservation {reservation_id}")
    if current.status == "expired" or (current.status == HELD and current.expires_at <= now):
        return ReservationExpired(
            "This reservation expired; its uses were released", status="expired"
        )
    if current.status != HELD:
        return ReservationNotHeld(
            f"This reservation was already {current.status}", status=current.status
        )
    uses = None if capture is None else capture.uses
    quantity = None if capture is None else capture.quantity
    carry = current.units_per_use is not None
    if capturing and uses is not None and carry:
        return InvalidRequest(
            f"This hold is by feature {current.feature!r}: capture its quantity, not uses"
        )
    if capturing and quantity is not None and not carry:
        return InvalidRequest("This hold is of uses: capture uses, not a quantity")
    if capturing and quantity is not None and quantity > int(current.quantity):
        return InvalidRequest(f"quantity: at most the {int(current.quantity)} held units")
    if capturing and uses is not None and uses > int(current.uses):
        return InvalidRequest(f"uses: at most the {int(current.uses)} held uses can be captured")
    return ReservationNotHeld("This reservation is not held", status=current.status)


async def get(conn: AsyncConnection, reservation_id: str) -> Row[Any]:
    """The reservation with its account's identity and counters, or 404."""
    found = (
        await conn.execute(
            select(reservations, *_account_columns())
            .join(accounts, accounts.c.id == reservations.c.account_id)
            .where(reservations.c.id == reservation_id)
        )
    ).first()
    if found is None:
        raise ReservationNotFound(f"No reservation {reservation_id}")
    return found


async def list_reservations(
    conn: AsyncConnection,
    identity: Identity | None,
    status: str | None,
    *,
    limit: int,
    offset: int,
) -> list[Row[Any]]:
    """Reservations with their account's identity and counters, newest first."""
    query = select(reservations, *_account_columns()).join(
        accounts, accounts.c.id == reservations.c.account_id
    )
    if identity is not None:
        query = query.where(identity_clause(identity))
    if status is not None:
        query = query.where(reservations.c.status == status)
    query = (
        query.order_by(reservations.c.created_at.desc(), reservations.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(await conn.execute(query))


def _account_columns() -> list[Any]:
    return [
        accounts.c.oauth_provider,
        accounts.c.external_id,
        accounts.c.free_uses_remaining,
        accounts.c.paid_uses_remaining,
        accounts.c.reserved_free_uses,
        accounts.c.reserved_paid_uses,
        accounts.c.total_uses,
        accounts.c.plan_name,
    ]
