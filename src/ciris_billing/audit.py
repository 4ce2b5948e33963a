"""The ledger invariant, checked: every account's counters equal the sum of its ledger rows,
and every purchase is credited exactly when it is paid.

`audit` reads the database only (fast; the tests run it after each test): counters against the
ledger, and each credited purchase against its one purchase credit. `audit_payments` also asks
the provider about every purchase (the CLI's `ciris-billing audit`): paid but not credited, or
credited but not paid, is a finding.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.db import accounts, charges, credits, purchases
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
class AuditReport:
    accounts_checked: int
    discrepancies: list[Discrepancy]
    purchase_findings: list[PurchaseFinding] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.discrepancies and not self.purchase_findings


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
    mismatched = await conn.execute(
        select(
            accounts.c.id,
            accounts.c.oauth_provider,
            accounts.c.external_id,
            accounts.c.free_uses_remaining,
            accounts.c.paid_uses_remaining,
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
                accounts.c.free_uses_remaining != ledger_free,
                accounts.c.paid_uses_remaining != ledger_paid,
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
    )


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
