"""The ledger invariant, checked: every account's counters equal the sum of its ledger rows,
and every purchase is credited exactly when it is paid.

Reservations: a hold moves uses out of free/paid_uses_remaining into reserved_free/paid_uses, so
the ledger's free (paid) sum is the account's available plus reserved free (paid) uses; each
account's reserved counters equal the sum over its active ('held') reservations; every
captured reservation is exactly one charge row referencing it, of the captured uses; and the
uses owed by holds (`refund_owed_uses`) are within the reserved paid uses and the shortfall
recorded by refunds and lost disputes, less the owed uses already taken.

Lots (issue 23, ledger/lot_audit.py): each lot's remaining equals its grant plus its
movements, within 0 and its grant; the wallet holds exactly the account's open lots; counters
are the wallet's sums by kind and reserved counters the open holds' lots by kind.

`audit` reads the database only (fast; the tests run it after each test): counters against the
ledger, and each credited purchase against its one purchase credit. `audit_payments` also asks
the provider about every purchase (the CLI's `ciris-billing audit`): paid but not credited, or
credited but not paid, is a finding.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.db import accounts, charges, credits, purchases, reservations
from ciris_billing.ledger.lot_audit import LotFinding, lot_findings
from ciris_billing.payments.providers.base import PaymentProvider


@dataclass(frozen=True, slots=True)
class Discrepancy:
    account_id: str
    oauth_provider: str
    external_id: str
    counters: tuple[int, int, int, int]  # free, paid, total and held uses on the account
    ledger: tuple[int, int, int, int]  # the same four, summed from credits and charges


@dataclass(frozen=True, slots=True)
class PurchaseFinding:
    purchase_id: str | None
    payment_id: str
    # credited_without_credit, credit_without_purchase (database); paid_but_uncredited,
    # credited_but_not_paid (against the provider)
    problem: str


@dataclass(frozen=True, slots=True)
class ReservationFinding:
    account_id: str
    reservation_id: str | None
    # reserved_counters_mismatch (account vs its active holds), capture_without_charge,
    # charge_without_capture (a charge naming a reservation not captured into it),
    # owed_uses_unaccounted (refund_owed_uses negative, above the reserved paid uses, or above
    # the shortfall refunds and lost disputes recorded less the owed uses already taken)
    problem: str


@dataclass(frozen=True, slots=True)
class AuditReport:
    accounts_checked: int
    discrepancies: list[Discrepancy]
    purchase_findings: list[PurchaseFinding] = field(default_factory=list)
    reservation_findings: list[ReservationFinding] = field(default_factory=list)
    lot_findings: list[LotFinding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return (
            not self.discrepancies
            and not self.purchase_findings
            and not self.reservation_findings
            and not self.lot_findings
        )


# The per-lot checks (ledger/lot_audit.py) run with the account-level ones; a switch only so
# that a deployment caught mid-upgrade can audit its accounts alone.
PER_LOT_CHECKS = True


async def audit(conn: AsyncConnection) -> AuditReport:
    credited = (
        select(
            credits.c.account_id,
            func.sum(credits.c.free_uses_delta).label("free"),
            func.sum(credits.c.paid_uses_delta).label("paid"),
            func.sum(credits.c.held_uses_delta).label("held"),
        )
        .group_by(credits.c.account_id)
        .subquery()
    )
    spent = (
        select(
            charges.c.account_id,
            func.sum(charges.c.free_uses_used).label("free"),
            func.sum(charges.c.paid_uses_used).label("paid"),
            func.sum(charges.c.uses).label("uses"),
        )
        .group_by(charges.c.account_id)
        .subquery()
    )
    ledger_free = func.coalesce(credited.c.free, 0) - func.coalesce(spent.c.free, 0)
    ledger_paid = func.coalesce(credited.c.paid, 0) - func.coalesce(spent.c.paid, 0)
    ledger_uses = func.coalesce(spent.c.uses, 0)
    ledger_held = func.coalesce(credited.c.held, 0)
    # What the ledger gave the account: available plus held by reservations.
    free_uses = accounts.c.free_uses_remaining + accounts.c.reserved_free_uses
    paid_uses = accounts.c.paid_uses_remaining + accounts.c.reserved_paid_uses
    mismatched = await conn.execute(
        select(
            accounts.c.id,
            accounts.c.oauth_provider,
            accounts.c.external_id,
            free_uses.label("free_uses_remaining"),
            paid_uses.label("paid_uses_remaining"),
            accounts.c.total_uses,
            accounts.c.held_uses,
            ledger_free.label("ledger_free"),
            ledger_paid.label("ledger_paid"),
            ledger_uses.label("ledger_uses"),
            ledger_held.label("ledger_held"),
        )
        .select_from(
            accounts.outerjoin(credited, credited.c.account_id == accounts.c.id).outerjoin(
                spent, spent.c.account_id == accounts.c.id
            )
        )
        .where(
            or_(
                free_uses != ledger_free,
                paid_uses != ledger_paid,
                accounts.c.total_uses != ledger_uses,
                accounts.c.held_uses != ledger_held,
                accounts.c.held_uses < 0,
                accounts.c.free_uses_remaining < 0,
                accounts.c.paid_uses_remaining < 0,
            )
        )
        .order_by(accounts.c.id)
    )
    discrepancies = [
        Discrepancy(
            account_id=row.id,
            oauth_provider=row.oauth_provider,
            external_id=row.external_id,
            counters=(
                int(row.free_uses_remaining),
                int(row.paid_uses_remaining),
                int(row.total_uses),
                int(row.held_uses),
            ),
            ledger=(
                int(row.ledger_free),
                int(row.ledger_paid),
                int(row.ledger_uses),
                int(row.ledger_held),
            ),
        )
        for row in mismatched
    ]
    checked = int(await conn.scalar(select(func.count()).select_from(accounts)) or 0)
    return AuditReport(
        accounts_checked=checked,
        discrepancies=discrepancies,
        purchase_findings=await _purchase_credits(conn),
        reservation_findings=await _reservations(conn),
        lot_findings=await lot_findings(conn) if PER_LOT_CHECKS else [],
    )


async def _reservations(conn: AsyncConnection) -> list[ReservationFinding]:
    """Reserved counters against active holds; captures against their charge rows."""
    active = (
        select(
            reservations.c.account_id,
            func.sum(reservations.c.free_uses_held).label("free"),
            func.sum(reservations.c.paid_uses_held).label("paid"),
        )
        .where(reservations.c.status == "held")
        .group_by(reservations.c.account_id)
        .subquery()
    )
    counters = await conn.execute(
        select(accounts.c.id)
        .select_from(accounts.outerjoin(active, active.c.account_id == accounts.c.id))
        .where(
            or_(
                accounts.c.reserved_free_uses != func.coalesce(active.c.free, 0),
                accounts.c.reserved_paid_uses != func.coalesce(active.c.paid, 0),
            )
        )
        .order_by(accounts.c.id)
    )
    charged = and_(
        charges.c.reservation_id == reservations.c.id,
        charges.c.id == reservations.c.charge_id,
        charges.c.account_id == reservations.c.account_id,
        charges.c.uses == reservations.c.captured_uses,
    )
    uncharged = await conn.execute(
        select(reservations.c.account_id, reservations.c.id)
        .select_from(reservations.outerjoin(charges, charged))
        .where(reservations.c.status == "captured", charges.c.id.is_(None))
        .order_by(reservations.c.id)
    )
    captured = and_(
        reservations.c.id == charges.c.reservation_id,
        reservations.c.status == "captured",
        reservations.c.charge_id == charges.c.id,
    )
    orphans = await conn.execute(
        select(charges.c.account_id, charges.c.reservation_id)
        .select_from(charges.outerjoin(reservations, captured))
        .where(charges.c.reservation_id.is_not(None), reservations.c.id.is_(None))
        .order_by(charges.c.reservation_id)
    )
    short = (
        select(
            credits.c.account_id,
            func.sum(
                case(
                    (credits.c.kind.in_(("refund", "dispute_lost")), credits.c.shortfall_uses),
                    (credits.c.kind == "owed_taken", credits.c.paid_uses_delta),
                    else_=0,
                )
            ).label("owed"),
        )
        .group_by(credits.c.account_id)
        .subquery()
    )
    owed = accounts.c.refund_owed_uses
    unaccounted = await conn.execute(
        select(accounts.c.id)
        .select_from(accounts.outerjoin(short, short.c.account_id == accounts.c.id))
        .where(
            or_(
                owed < 0,
                owed > accounts.c.reserved_paid_uses,
                owed > func.coalesce(short.c.owed, 0),
            )
        )
        .order_by(accounts.c.id)
    )
    return [
        *(ReservationFinding(r.id, None, "reserved_counters_mismatch") for r in counters),
        *(ReservationFinding(r.id, None, "owed_uses_unaccounted") for r in unaccounted),
        *(ReservationFinding(r.account_id, r.id, "capture_without_charge") for r in uncharged),
        *(
            ReservationFinding(r.account_id, r.reservation_id, "charge_without_capture")
            for r in orphans
        ),
    ]


async def _purchase_credits(conn: AsyncConnection) -> list[PurchaseFinding]:
    """A credited purchase has its one purchase credit, and a purchase credit its purchase."""
    credit = credits.alias("credit")
    is_purchase_credit = and_(
        credit.c.kind == "purchase", credit.c.external_transaction_id == purchases.c.payment_id
    )
    uncredited = await conn.execute(
        select(purchases.c.id, purchases.c.payment_id)
        .select_from(purchases.outerjoin(credit, is_purchase_credit))
        .where(purchases.c.credited_at.is_not(None), credit.c.id.is_(None))
        .order_by(purchases.c.id)
    )
    orphans = await conn.execute(
        select(credits.c.external_transaction_id)
        .select_from(
            credits.outerjoin(
                purchases,
                and_(
                    purchases.c.payment_id == credits.c.external_transaction_id,
                    purchases.c.credited_at.is_not(None),
                ),
            )
        )
        .where(credits.c.kind == "purchase", purchases.c.id.is_(None))
        .order_by(credits.c.external_transaction_id)
    )
    return [
        *(PurchaseFinding(r.id, r.payment_id, "credited_without_credit") for r in uncredited),
        *(
            PurchaseFinding(None, str(r.external_transaction_id), "credit_without_purchase")
            for r in orphans
        ),
    ]


async def audit_payments(
    engine: AsyncEngine, provider: PaymentProvider, concurrency: int = 8
) -> list[PurchaseFinding]:
    """Every purchase of `provider` against the payment as the provider reports it now: paid
    and not credited, or credited and not paid, is a finding. (A payment paid this very second
    may show as not credited yet: its webhook is on its way; run again to tell.)"""
    async with engine.connect() as conn:
        rows = list(
            await conn.execute(
                select(purchases.c.id, purchases.c.payment_id, purchases.c.credited_at)
                .where(purchases.c.provider == provider.name)
                .order_by(purchases.c.created_at)
            )
        )
    gate = asyncio.Semaphore(concurrency)

    async def check(row: Any) -> PurchaseFinding | None:
        async with gate:
            payment = await provider.get_payment(row.payment_id)
        paid = payment is not None and payment.state == "succeeded"
        if paid and row.credited_at is None:
            return PurchaseFinding(row.id, row.payment_id, "paid_but_uncredited")
        if row.credited_at is not None and not paid:
            return PurchaseFinding(row.id, row.payment_id, "credited_but_not_paid")
        return None

    found = await asyncio.gather(*(check(row) for row in rows))
    return [finding for finding in found if finding is not None]
