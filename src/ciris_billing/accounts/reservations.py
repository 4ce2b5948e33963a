"""Reservations (holds): uses set aside for an interaction whose cost is known only at its end.

A hold moves its uses OUT of the account's free/paid_uses_remaining (free ones first) into
`reserved_free_uses` / `reserved_paid_uses`, and the reservation row remembers the split. So the
charge statement (hot/writer.py), refunds, disputes and grants need no change: what they can
take is what is left outside the holds. Capture turns the hold into one charge row (free uses
charged first) and gives back the rest; release and expiry give all of it back, each to the
counter it came from.

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
from ciris_billing.db import accounts, charges, iso, new_id, reservations, utcnow
from ciris_billing.errors import (
    AccountNotFound,
    AccountSuspended,
    InvalidRequest,
    ReservationExpired,
    ReservationNotFound,
    ReservationNotHeld,
)
from ciris_billing.events.outbox import RESERVATION_EXPIRED, record_available_change, record_event
from ciris_billing.ledger import write_credit
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


@dataclass(frozen=True, slots=True)
class CaptureRequest:
    reservation_id: str
    uses: int | None  # None: all the held uses
    amount_minor: int
    description: str | None
    metadata: dict[str, Any]
    api_key_id: str


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
    """Hold `request.uses` of the identity's account (which must exist), free uses first, or
    raise 402 (not enough available) / 403 (suspended)."""
    now = utcnow()
    # Safe: the account's row is locked until the transaction ends, so the counters read here
    # are the ones the UPDATE below changes (no concurrent hold or charge in between).
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
    free, paid = int(account.free_uses_remaining), int(account.paid_uses_remaining)
    if free + paid < request.uses:
        raise purchase_required(account, request.uses, pricing)
    free_held = min(free, request.uses)
    paid_held = request.uses - free_held
    account = await _move_uses(
        conn,
        account.id,
        reserved=(free_held, paid_held),
        available=(-free_held, -paid_held),
        now=now,
    )
    reservation = (
        await conn.execute(
            reservations.insert()
            .values(
                id=new_id("rsv"),
                account_id=account.id,
                api_key_id=request.api_key_id,
                status=HELD,
                uses=request.uses,
                free_uses_held=free_held,
                paid_uses_held=paid_held,
                expires_at=now + timedelta(seconds=request.ttl_seconds),
                metadata=request.metadata,
                idempotency_key=request.idempotency_key,
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
    """Charge `request.uses` (all when None) of an active hold as one charge row and give the
    rest back; 409 when it is expired (by the clock, whatever the job's delay) or no longer
    held; 422 for more than was held."""
    now = utcnow()
    charge_id = new_id("ch")
    wanted = request.uses if request.uses is not None else reservations.c.uses
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
        raise await _why_not(conn, request.reservation_id, now, request.uses, capturing=True)
    uses = int(won.captured_uses)
    free_held, paid_held = int(won.free_uses_held), int(won.paid_uses_held)
    free_used = min(uses, free_held)
    paid_used = uses - free_used
    account = await _move_uses(
        conn,
        won.account_id,
        reserved=(-free_held, -paid_held),
        available=(free_held - free_used, paid_held - paid_used),
        spent=uses,
        now=now,
        why=won.id,
        ending={won.id: (won, paid_held - paid_used)},
    )
    charge = (
        await conn.execute(
            charges.insert()
            .values(
                id=charge_id,
                account_id=account.id,
                uses=uses,
                free_uses_used=free_used,
                paid_uses_used=paid_used,
                amount_minor=request.amount_minor,
                currency=account.currency,
                description=request.description,
                metadata={**dict(won._mapping["metadata"]), **request.metadata},
                api_key_id=request.api_key_id,
                reservation_id=won.id,
                free_uses_after=account.free_uses_remaining,
                paid_uses_after=account.paid_uses_remaining,
                total_uses_after=account.total_uses,
                created_at=now,
            )
            .returning(*charges.c)
        )
    ).one()
    return Outcome(won, account, charge)


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
    free = sum(int(r.free_uses_held) for r in held)
    paid = sum(int(r.paid_uses_held) for r in held)
    why = ", ".join(r.id for r in held)
    return await _move_uses(
        conn,
        account_id,
        reserved=(-free, -paid),
        available=(free, paid),
        now=now,
        why=why,
        ending={r.id: (r, int(r.paid_uses_held)) for r in held},
    )


def owed_after(owed: int, paid_back: int, reserved_paid_after: int) -> tuple[int, int]:
    """(uses paid off, uses still owed) when holds give `paid_back` paid uses back and leave
    `reserved_paid_after` reserved: owed uses are paid off first, and no more stays owed than
    is still held (a captured hold's uses were spent: plain shortfall). The hot capture
    statement (hot/holds.py) computes the same in SQL."""
    paid_off = min(owed, paid_back)
    return paid_off, min(owed - paid_off, reserved_paid_after)


async def _move_uses(
    conn: AsyncConnection,
    account_id: str,
    *,
    reserved: tuple[int, int],
    available: tuple[int, int],
    spent: int = 0,
    now: datetime,
    why: str = "",
    ending: dict[str, tuple[Row[Any], int]] | None = None,
) -> Row[Any]:
    """Change the account's (free, paid) reserved and available counters by these amounts, and
    its total uses by `spent`: the one account update of hold, capture, release and expiry
    (CHECK constraints keep every counter at zero or above). Paid uses leaving a hold pay off
    the account's owed uses first (`refund_owed_uses`: what a refund or a lost dispute could
    not take because it was held), with an `owed_taken` ledger row; then the uses a dispute
    could not hold because an ending reservation (`ending`: id -> (row, paid uses it gives
    back)) held them go into that dispute's hold (payments/disputes.py: owed_to_disputes)."""
    paid_off, owed = 0, None
    if reserved[1] < 0:
        # Safe: the account's row stays locked until the transaction ends, so the owed uses
        # read here are the ones the UPDATE below settles (lock order: the reservation's row,
        # already locked by the caller's UPDATE, then the account's).
        locked = (
            await conn.execute(
                select(accounts.c.refund_owed_uses, accounts.c.reserved_paid_uses)
                .where(accounts.c.id == account_id)
                .with_for_update()
            )
        ).one()
        if int(locked.refund_owed_uses):
            paid_off, owed = owed_after(
                int(locked.refund_owed_uses),
                max(available[1], 0),
                int(locked.reserved_paid_uses) + reserved[1],
            )
    to_disputes = 0
    if ending and any(int(row.owed_uses) for row, _ in ending.values()):
        # Safe: the account's row is locked (above: reserved[1] < 0 whenever a hold ends with
        # paid uses), and a dispute closes only under that lock too (disputes._close), so a
        # dispute read open here is open until this transaction ends.
        to_disputes = await disputes.owed_to_disputes(
            conn, account_id, ending, max(available[1], 0) - paid_off, why
        )
    values: dict[str, Any] = {
        "reserved_free_uses": accounts.c.reserved_free_uses + reserved[0],
        "reserved_paid_uses": accounts.c.reserved_paid_uses + reserved[1],
        "free_uses_remaining": accounts.c.free_uses_remaining + available[0],
        "paid_uses_remaining": accounts.c.paid_uses_remaining
        + available[1]
        - paid_off
        - to_disputes,
        "held_uses": accounts.c.held_uses + to_disputes,
        "total_uses": accounts.c.total_uses + spent,
        "updated_at": now,
    }
    if owed is not None:
        values["refund_owed_uses"] = owed
    account = (
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == account_id)
            .values(**values)
            .returning(*accounts.c)
        )
    ).one()
    if paid_off:
        await write_credit(
            conn,
            account_id=account_id,
            kind="owed_taken",
            currency=account.currency,
            paid=-paid_off,
            description=f"{paid_off} paid uses owed to a refund or a lost dispute, taken when "
            f"held uses came back ({why})"[:500],
        )
    return account


async def _find(conn: AsyncConnection, reservation_id: str) -> Row[Any] | None:
    return (
        await conn.execute(select(reservations).where(reservations.c.id == reservation_id))
    ).first()


async def _why_not(
    conn: AsyncConnection, reservation_id: str, now: datetime, uses: int | None, *, capturing: bool
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
