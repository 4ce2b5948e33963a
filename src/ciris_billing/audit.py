"""The ledger invariant, checked: every account's counters equal the sum of its ledger rows."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts, charges, credits


@dataclass(frozen=True, slots=True)
class Discrepancy:
    account_id: str
    oauth_provider: str
    external_id: str
    counters: tuple[int, int, int, int]  # free, paid, total and held uses on the account
    ledger: tuple[int, int, int, int]  # the same four, summed from credits and charges


@dataclass(frozen=True, slots=True)
class AuditReport:
    accounts_checked: int
    discrepancies: list[Discrepancy]

    @property
    def clean(self) -> bool:
        return not self.discrepancies


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
    return AuditReport(accounts_checked=checked, discrepancies=discrepancies)
