"""What the console's pages show: read-only queries, each bounded (a page never reads a whole
table; the ledger is paged by key, so its 10,000th row costs what its first does)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Row, String, and_, cast, func, literal, null, or_, select, tuple_, union_all
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from ciris_billing.db import (
    accounts,
    charges,
    credits,
    disputes,
    lots,
    purchases,
    reservations,
    utcnow,
    webhook_events,
)

# Outcomes of a handled event that changed nothing and may need a person's eyes.
UNAPPLIED_OUTCOMES = (
    "unknown_payment",
    "unknown_dispute",
    "amount_mismatch",
    "purchase_mismatch",
    "not_ours",
)
# Purchases that should have become final by now (the reconcile job asks about them).
IN_FLIGHT = ("pending", "requires_action", "processing")


def start_of_day(now: datetime) -> datetime:
    return datetime(now.year, now.month, now.day, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Overview:
    day: datetime
    charges: int
    uses_charged: int
    purchases_started: int
    purchases_paid: int
    revenue: list[tuple[str, int]]  # (currency, minor units) paid today
    unhandled_events: int
    attention: list[Row[Any]]  # purchases stuck in flight
    open_disputes: list[Row[Any]]


async def overview(conn: AsyncConnection, stuck_after: timedelta) -> Overview:
    now = utcnow()
    day = start_of_day(now)
    # The day's charges through the BRIN index on created_at (db.py).
    charged = (
        await conn.execute(
            select(func.count(), func.coalesce(func.sum(charges.c.uses), 0)).where(
                charges.c.created_at >= day
            )
        )
    ).one()
    started = await conn.scalar(
        select(func.count()).select_from(purchases).where(purchases.c.created_at >= day)
    )
    paid = list(
        await conn.execute(
            select(purchases.c.currency, func.count(), func.sum(purchases.c.amount_minor))
            .where(purchases.c.credited_at >= day)
            .group_by(purchases.c.currency)
            .order_by(purchases.c.currency)
        )
    )
    unhandled = await conn.scalar(
        select(func.count())
        .select_from(webhook_events)
        .where(webhook_events.c.handled_at.is_(None))
    )
    stuck = list(
        await conn.execute(
            select(purchases)
            .where(
                purchases.c.status.in_(IN_FLIGHT),
                purchases.c.created_at <= now - stuck_after,
                purchases.c.created_at >= now - timedelta(days=30),
            )
            .order_by(purchases.c.created_at.desc())
            .limit(20)
        )
    )
    open_disputes = list(
        await conn.execute(
            select(disputes, purchases.c.account_id, purchases.c.payment_id.label("payment"))
            .join(purchases, purchases.c.id == disputes.c.purchase_id)
            .where(disputes.c.state == "open")
            .order_by(disputes.c.created_at.desc())
            .limit(20)
        )
    )
    return Overview(
        day=day,
        charges=int(charged[0]),
        uses_charged=int(charged[1]),
        purchases_started=int(started or 0),
        purchases_paid=sum(int(row[1]) for row in paid),
        revenue=[(row[0], int(row[2])) for row in paid],
        unhandled_events=int(unhandled or 0),
        attention=stuck,
        open_disputes=open_disputes,
    )


def _containing(text: str) -> str:
    """An ILIKE pattern for `text` anywhere, its own % _ and \\ taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def search(conn: AsyncConnection, text: str, limit: int = 50) -> list[Row[Any]]:
    """Accounts whose id (`acct_...`), external id, email or display name contains `text`, or
    with a purchase whose payment id (`pi_...`) contains it; whatever the case, any part
    (`provider/external id` matches the identity). What is stored is searched: an erased
    account's identity and email are keyed digests, found by their stored form only. The
    console's search and `ciris-billing accounts search` both. An operator's tool: a scan is
    fine at its scale (newest first, `limit` rows)."""
    query = text.strip()
    if not query or len(query) > 320:
        return []
    pattern = _containing(query)
    clauses: list[ColumnElement[bool]] = [
        accounts.c.id.ilike(pattern, escape="\\"),
        accounts.c.external_id.ilike(pattern, escape="\\"),
        accounts.c.customer_email.ilike(pattern, escape="\\"),
        accounts.c.display_name.ilike(pattern, escape="\\"),
        accounts.c.id.in_(
            select(purchases.c.account_id).where(purchases.c.payment_id.ilike(pattern, escape="\\"))
        ),
    ]
    provider, slash, external_id = query.partition("/")
    if slash and external_id:
        clauses.append(
            and_(
                func.lower(accounts.c.oauth_provider) == provider.lower(),
                accounts.c.external_id.ilike(_containing(external_id), escape="\\"),
            )
        )
    return list(
        await conn.execute(
            select(accounts)
            .where(or_(*clauses))
            .order_by(accounts.c.created_at.desc())
            .limit(limit)
        )
    )


async def account(conn: AsyncConnection, account_id: str) -> Row[Any] | None:
    return (await conn.execute(select(accounts).where(accounts.c.id == account_id))).first()


async def lot(conn: AsyncConnection, lot_id: str) -> Row[Any] | None:
    """A lot with what it has left now (its wallet slot; 0 once closed)."""
    left = func.coalesce(
        accounts.c.lot_left[func.array_position(accounts.c.lot_ids, lots.c.id)], 0
    ).label("left")
    return (
        await conn.execute(
            select(lots, left)
            .join(accounts, accounts.c.id == lots.c.account_id)
            .where(lots.c.id == lot_id)
        )
    ).first()


# The ledger, a page at a time: (created_at, id) of the last row shown is the cursor.
LEDGER_PAGE = 50


def encode_cursor(created_at: datetime, row_id: str) -> str:
    """The cursor after the row (created_at, id): opaque to the reader, not a secret."""
    raw = f"{created_at.isoformat()}|{row_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    if not cursor or len(cursor) > 200:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        moment, _, row_id = raw.partition("|")
        when = datetime.fromisoformat(moment)
    except ValueError:
        return None
    if not row_id or when.tzinfo is None:
        return None
    return when, row_id


@dataclass(frozen=True, slots=True)
class LedgerPage:
    rows: list[Row[Any]]
    next_cursor: str | None


async def ledger(
    conn: AsyncConnection, account_id: str, cursor: str | None, size: int = LEDGER_PAGE
) -> LedgerPage:
    """Charges and credits as one ledger, newest first, `size` rows after the cursor.

    Keyset pagination: each table is read backwards along its (account_id, created_at) index
    from the cursor, at most size + 1 rows each, then merged; no OFFSET, so any page costs the
    same."""
    after = decode_cursor(cursor)
    charge_rows = select(
        charges.c.id.label("transaction_id"),
        literal("charge").label("kind"),
        (-charges.c.free_uses_used).label("free_uses_delta"),
        (-charges.c.paid_uses_used).label("paid_uses_delta"),
        literal(0).label("held_uses_delta"),
        literal(0).label("shortfall_uses"),
        charges.c.amount_minor,
        charges.c.currency,
        charges.c.description,
        cast(null(), String).label("external_transaction_id"),
        charges.c.created_at,
    ).where(charges.c.account_id == account_id)
    credit_rows = select(
        credits.c.id,
        credits.c.kind,
        credits.c.free_uses_delta,
        credits.c.paid_uses_delta,
        credits.c.held_uses_delta,
        credits.c.shortfall_uses,
        credits.c.amount_minor,
        credits.c.currency,
        credits.c.description,
        credits.c.external_transaction_id,
        credits.c.created_at,
    ).where(credits.c.account_id == account_id)
    if after is not None:
        charge_rows = charge_rows.where(tuple_(charges.c.created_at, charges.c.id) < after)
        credit_rows = credit_rows.where(tuple_(credits.c.created_at, credits.c.id) < after)
    charge_rows = charge_rows.order_by(charges.c.created_at.desc(), charges.c.id.desc()).limit(
        size + 1
    )
    credit_rows = credit_rows.order_by(credits.c.created_at.desc(), credits.c.id.desc()).limit(
        size + 1
    )
    merged = union_all(charge_rows.subquery().select(), credit_rows.subquery().select()).subquery()
    rows = list(
        await conn.execute(
            select(merged)
            .order_by(merged.c.created_at.desc(), merged.c.transaction_id.desc())
            .limit(size + 1)
        )
    )
    more = len(rows) > size
    rows = rows[:size]
    last = rows[-1] if more and rows else None
    return LedgerPage(rows, encode_cursor(last.created_at, last.transaction_id) if last else None)


@dataclass(frozen=True, slots=True)
class AccountDetail:
    account: Row[Any]
    purchases: list[Row[Any]]
    reservations: list[Row[Any]]
    refunds: list[Row[Any]]
    disputes: list[Row[Any]]
    events: list[Row[Any]]
    recent_charges: list[Row[Any]]


async def account_detail(conn: AsyncConnection, row: Row[Any]) -> AccountDetail:
    account_id = row.id
    bought = list(
        await conn.execute(
            select(purchases)
            .where(purchases.c.account_id == account_id)
            .order_by(purchases.c.created_at.desc())
            .limit(50)
        )
    )
    held = list(
        await conn.execute(
            select(reservations)
            .where(reservations.c.account_id == account_id)
            .order_by(reservations.c.created_at.desc(), reservations.c.id.desc())
            .limit(20)
        )
    )
    refunded = list(
        await conn.execute(
            select(credits)
            .where(credits.c.account_id == account_id, credits.c.kind == "refund")
            .order_by(credits.c.created_at.desc())
            .limit(50)
        )
    )
    payment_ids = [p.payment_id for p in bought]
    disputed = list(
        await conn.execute(
            select(disputes, purchases.c.payment_id)
            .join(purchases, purchases.c.id == disputes.c.purchase_id)
            .where(purchases.c.account_id == account_id)
            .order_by(disputes.c.created_at.desc())
            .limit(50)
        )
    )
    events = (
        list(
            await conn.execute(
                select(webhook_events)
                .where(webhook_events.c.payment_id.in_(payment_ids))
                .order_by(webhook_events.c.received_at.desc())
                .limit(30)
            )
        )
        if payment_ids
        else []
    )
    recent = list(
        await conn.execute(
            select(charges)
            .where(charges.c.account_id == account_id)
            .order_by(charges.c.created_at.desc(), charges.c.id.desc())
            .limit(10)
        )
    )
    return AccountDetail(row, bought, held, refunded, disputed, events, recent)


async def inbox(conn: AsyncConnection, limit: int = 100) -> tuple[list[Row[Any]], list[Row[Any]]]:
    """(unhandled events, oldest first; events of the last 7 days handled without effect)."""
    unhandled = list(
        await conn.execute(
            select(webhook_events)
            .where(webhook_events.c.handled_at.is_(None))
            .order_by(webhook_events.c.received_at)
            .limit(limit)
        )
    )
    unapplied = list(
        await conn.execute(
            select(webhook_events)
            .where(
                webhook_events.c.handled_at >= utcnow() - timedelta(days=7),
                webhook_events.c.outcome.in_(UNAPPLIED_OUTCOMES),
            )
            .order_by(webhook_events.c.handled_at.desc())
            .limit(limit)
        )
    )
    return unhandled, unapplied


async def event(conn: AsyncConnection, event_id: str) -> Row[Any] | None:
    return (
        await conn.execute(select(webhook_events).where(webhook_events.c.id == event_id))
    ).first()


async def purchase(conn: AsyncConnection, payment_id: str) -> Row[Any] | None:
    return (
        await conn.execute(select(purchases).where(purchases.c.payment_id == payment_id))
    ).first()


async def reservation(conn: AsyncConnection, reservation_id: str) -> Row[Any] | None:
    return (
        await conn.execute(select(reservations).where(reservations.c.id == reservation_id))
    ).first()


async def account_of_payment(conn: AsyncConnection, payment_id: str | None) -> str | None:
    if not payment_id:
        return None
    found = await purchase(conn, payment_id)
    return None if found is None else str(found.account_id)
