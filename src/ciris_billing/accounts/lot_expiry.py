"""The lots' background work (issue 23 item 4), run every JOBS_POLL_SECONDS by the recovery
job (jobs.py):

- each open lot whose expires_at has passed (or that was voided while held) is closed: its
  remaining uses written off as one `expired` movement (breakage, ledger/closing.py), the
  event `credits.expired` (lot_id, uses, expires_at) and any balance crossing; the uses were
  unusable from the expiry's instant already (the walk and the checks skip an expired lot),
  this only writes it down;
- each open lot expiring within CREDITS_EXPIRING_NOTICE_DAYS gets `credits.expiring`, once
  (lots.expiring_notified_at, set by a conditional UPDATE: a second run, or a second worker,
  finds it set and sends nothing).

One lot per unit of work, its account's row locked first (then the lot's): the one lock order.
Running twice is safe: a closed lot is not open any more (close_lot returns None).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.db import iso, lots
from ciris_billing.events.outbox import (
    CREDITS_EXPIRED,
    CREDITS_EXPIRING,
    record_available_change,
    record_event,
)
from ciris_billing.ledger.closing import EXPIRED, Closed, Why, close_lot, due_lots
from ciris_billing.ledger.wallet import lock_wallet
from ciris_billing.observability import log
from ciris_billing.unit_of_work import unit_of_work

BATCH = 200
PAGES = 5  # at most PAGES * BATCH lots looked at per run (the next run takes the rest)


@dataclass
class LotsReport:
    expired: int = 0  # lots closed (expired, or voided ones whose holds ended)
    expired_uses: int = 0
    notified: int = 0
    failures: int = 0


async def record_closed(conn: AsyncConnection, closed: Closed) -> None:
    """The events of a close, in its transaction: credits.expired for an expiry with uses
    left, and the balance crossing the lower counters make (a void's too)."""
    if not closed.uses:
        return
    if closed.movement == EXPIRED:
        await record_event(
            conn,
            closed.account_id,
            CREDITS_EXPIRED,
            {
                "lot_id": closed.lot_id,
                "lot_kind": closed.kind,
                "uses": closed.uses,
                "expires_at": iso(closed.expires_at) if closed.expires_at else None,
            },
        )
    await record_available_change(conn, closed.account, -closed.uses)


async def expire_lots(engine: AsyncEngine, at: datetime, batch: int = BATCH) -> LotsReport:
    """Close the lots due at `at`, one unit of work each."""
    report = LotsReport()
    due: list[str] = []
    after = None
    for _ in range(PAGES):
        async with engine.connect() as conn:
            page = await due_lots(conn, at, batch, after)
        due += [lot_id for _due, lot_id in page]
        if len(page) < batch:
            break
        after = page[-1]
    for lot_id in due:
        try:
            async with unit_of_work(engine) as work:
                conn = await work.connection()
                closed = await close_lot(conn, lot_id, Why(EXPIRED), at)
                if closed is not None:
                    await record_closed(conn, closed)
        except Exception as exc:  # nothing committed for it: due again next run
            report.failures += 1
            log.warning("job_expire_lot_failed", lot_id=lot_id, error=type(exc).__name__)
            continue
        if closed is not None and (closed.uses or closed.removed):
            report.expired += 1
            report.expired_uses += closed.uses
            log.info(
                "lot_closed",
                lot_id=lot_id,
                account_id=closed.account_id,
                uses=closed.uses,
                status=closed.status,
            )
    return report


async def notify_expiring(
    engine: AsyncEngine, at: datetime, notice_days: int, batch: int = BATCH
) -> LotsReport:
    """credits.expiring for each open lot expiring within `notice_days` of `at`, once."""
    report = LotsReport()
    if notice_days <= 0:
        return report
    horizon = at + timedelta(days=notice_days)
    async with engine.connect() as conn:
        soon = (
            await conn.execute(
                select(lots.c.id, lots.c.account_id)
                .where(
                    lots.c.status == "active",
                    lots.c.expires_at > at,
                    lots.c.expires_at <= horizon,
                    lots.c.expiring_notified_at.is_(None),
                    lots.c.voided_at.is_(None),
                )
                .order_by(lots.c.expires_at)
                .limit(batch)
            )
        ).all()
    for lot in soon:
        try:
            async with unit_of_work(engine) as work:
                conn = await work.connection()
                sent = await _notify(conn, lot.id, lot.account_id, at)
        except Exception as exc:  # nothing committed: due again next run
            report.failures += 1
            log.warning("job_lot_notice_failed", lot_id=lot.id, error=type(exc).__name__)
            continue
        report.notified += int(sent)
    return report


async def _notify(conn: AsyncConnection, lot_id: str, account_id: str, at: datetime) -> bool:
    wallet = await lock_wallet(conn, account_id)  # the account first: the one lock order
    # Conditional: of two runs (or workers) only one sets the marker, so one event goes out.
    marked = (
        await conn.execute(
            lots.update()
            .where(
                lots.c.id == lot_id,
                lots.c.status == "active",
                lots.c.expiring_notified_at.is_(None),
            )
            .values(expiring_notified_at=at)
            .returning(lots.c.kind, lots.c.expires_at)
        )
    ).first()
    if marked is None or lot_id not in wallet.ids:
        return False
    left = int(wallet.left[wallet.ids.index(lot_id)])
    if not left:
        return False  # nothing left to expire (used up, or all held): nothing to announce
    await record_event(
        conn,
        account_id,
        CREDITS_EXPIRING,
        {
            "lot_id": lot_id,
            "lot_kind": marked.kind,
            "uses": left,
            "expires_at": iso(marked.expires_at),
        },
    )
    return True


async def run_once(engine: AsyncEngine, at: datetime, notice_days: int) -> LotsReport:
    """One run: the expiring notices, then the closes."""
    notices = await notify_expiring(engine, at, notice_days)
    report = await expire_lots(engine, at)
    report.notified = notices.notified
    report.failures += notices.failures
    return report
