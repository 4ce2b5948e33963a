"""The billing rules for accounts and the ledger (checks: checks.py; charges: charges.py).

Functions here take an open connection inside the caller's transaction and never commit.
Every change to a counter writes its ledger row in that same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, String, case, cast, func, literal, null, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import installation
from ciris_billing.accounts.erasure import erased_digest
from ciris_billing.db import (
    accounts,
    charges,
    credits,
    insert_or_ignore,
    new_id,
    plans,
    utcnow,
)
from ciris_billing.errors import AccountNotFound, PurchaseRequired
from ciris_billing.events.outbox import ACCOUNT_CREATED, record_event
from ciris_billing.ledger.free_periods import next_period, period_of
from ciris_billing.ledger.wallet import Credit, NewLot, add_lot
from ciris_billing.pricing import Pricing

NO_USES_LEFT = "No free uses or credits remaining"  # the guide's words


def purchase_required(account: Any, uses: int, pricing: Pricing) -> PurchaseRequired:
    """The 402 for `uses` the account does not have available (a charge's or a hold's): the
    offer, and what the account holds now (available free and paid uses, uses held)."""
    row = account._mapping if hasattr(account, "_mapping") else account
    return PurchaseRequired(
        NO_USES_LEFT,
        purchase_required=True,
        purchase_price_minor=pricing.price_per_purchase_minor,
        purchase_uses=pricing.paid_uses_per_purchase,
        currency=pricing.currency,
        free_uses_remaining=int(row["free_uses_remaining"]),
        credits_remaining=int(row["paid_uses_remaining"]),
        held_uses=int(row["reserved_free_uses"]) + int(row["reserved_paid_uses"]),
        uses_requested=uses,
    )


@dataclass(frozen=True, slots=True)
class Identity:
    oauth_provider: str
    external_id: str


# plan_name: `free` until the account first gets paid uses (a purchase credited, a grant, an
# initial balance), then `paid`; a plan an app names when it creates the account stays.
# balance.low's default threshold applies only past `free` (events/outbox.py THRESHOLD_SQL).
FREE_PLAN = "free"
PAID_PLAN = "paid"


def plan_with_paid_uses() -> Any:
    """The account's plan_name once it gets paid uses (an UPDATE's value): `paid` for `free`."""
    return case((accounts.c.plan_name == FREE_PLAN, PAID_PLAN), else_=accounts.c.plan_name)


@dataclass(frozen=True, slots=True)
class NewAccount:
    """What a caller may set when an account is created (ignored when it already exists)."""

    initial_paid_uses: int = 0
    currency: str | None = None
    plan_name: str = FREE_PLAN
    customer_email: str | None = None
    display_name: str | None = None


def identity_clause(identity: Identity) -> Any:
    return (accounts.c.oauth_provider == identity.oauth_provider) & (
        accounts.c.external_id == identity.external_id
    )


async def find_account(conn: AsyncConnection, identity: Identity) -> Row[Any] | None:
    result = await conn.execute(select(accounts).where(identity_clause(identity)))
    return result.first()


async def get_account(conn: AsyncConnection, identity: Identity) -> Row[Any]:
    row = await find_account(conn, identity)
    if row is None:
        raise AccountNotFound(
            f"No account for {identity.oauth_provider} {identity.external_id}",
        )
    return row


async def ensure_account(
    conn: AsyncConnection, identity: Identity, pricing: Pricing, new: NewAccount = NewAccount()
) -> tuple[Row[Any], bool]:
    """Get the identity's account, creating it with its free uses if it does not exist.

    Safe when first requests race: the unique (oauth_provider, external_id) constraint lets
    exactly one INSERT win; the others insert nothing and read the winner's row. The free-use
    grant is written only by the winner, in its own transaction, so it happens once.
    """
    now = utcnow()
    account_id = new_id("acct")
    currency = new.currency or pricing.currency
    free_uses, monthly = pricing.free_uses_per_account, pricing.monthly_free_uses
    threshold: int | None = None
    if new.plan_name not in (FREE_PLAN, PAID_PLAN):
        # A plan of the catalog (catalog/plans.py): its own free uses and period.
        plan = (
            await conn.execute(
                select(
                    plans.c.free_uses, plans.c.free_uses_reset, plans.c.low_balance_threshold_uses
                ).where(plans.c.name == new.plan_name)
            )
        ).first()
        if plan is not None:
            free_uses, monthly = int(plan.free_uses), plan.free_uses_reset == "monthly"
            threshold = plan.low_balance_threshold_uses
    inserted = await conn.execute(
        insert_or_ignore(accounts)
        .values(
            id=account_id,
            oauth_provider=identity.oauth_provider,
            external_id=identity.external_id,
            customer_email=new.customer_email,
            display_name=new.display_name,
            plan_name=(
                PAID_PLAN
                if new.initial_paid_uses > 0 and new.plan_name == FREE_PLAN
                else new.plan_name
            ),
            currency=currency,
            status="active",
            # The counters and the wallet start empty: the lots below fill them (ledger/).
            free_uses_remaining=0,
            paid_uses_remaining=0,
            total_uses=0,
            last_charge_free_uses=0,
            # Monthly free uses: a new account starts in its month (its free lot below, or
            # none for an identity back after erasure, until the next month).
            free_period=period_of(now) if monthly else None,
            low_balance_threshold_uses=threshold,
            created_at=now,
            updated_at=now,
        )
        .returning(accounts.c.id)
    )
    created = inserted.first() is not None
    if created and free_uses and await _was_erased(conn, identity):
        # An identity that comes back after erasure gets a new account without new free uses
        # (erase-and-return must not be a way to free uses). In the creating transaction, so
        # the account is never seen with them.
        free_uses = 0
    if created:
        if free_uses:
            await add_lot(
                conn,
                account_id,
                NewLot(
                    kind="free",
                    uses=free_uses,
                    source="free_grant",
                    # Monthly: this month's free uses, unusable from the next month's start.
                    expires_at=next_period(now) if monthly else None,
                ),
                Credit(
                    kind="free_grant", currency=currency, description="Free uses for a new account"
                ),
                at=now,
            )
        if new.initial_paid_uses:
            await add_lot(
                conn,
                account_id,
                NewLot(kind="promotional", uses=new.initial_paid_uses, source="initial_balance"),
                Credit(kind="initial_balance", currency=currency, description="Initial balance"),
                at=now,
            )
        # In the creating transaction: the event exists exactly when the account does.
        await record_event(
            conn,
            account_id,
            ACCOUNT_CREATED,
            {
                "currency": currency,
                "plan_name": new.plan_name,
                "free_uses_remaining": free_uses,
                "paid_uses_remaining": new.initial_paid_uses,
            },
        )
    return await get_account(conn, identity), created


async def _was_erased(conn: AsyncConnection, identity: Identity) -> bool:
    digest = erased_digest(
        await installation.erasure_key(conn), identity.oauth_provider, identity.external_id
    )
    found = await conn.execute(
        select(accounts.c.id)
        .where(accounts.c.oauth_provider == identity.oauth_provider)
        .where(accounts.c.erased_digest == digest)
        .limit(1)
    )
    return found.first() is not None


async def list_transactions(
    conn: AsyncConnection, account_id: str, *, limit: int, offset: int
) -> tuple[list[Row[Any]], int]:
    """The account's ledger, newest first: charges and credits as one list."""
    charge_rows = select(
        charges.c.id.label("transaction_id"),
        literal("charge").label("type"),
        literal("charge").label("kind"),
        (-charges.c.free_uses_used).label("free_uses_delta"),
        (-charges.c.paid_uses_used).label("paid_uses_delta"),
        charges.c.amount_minor,
        charges.c.currency,
        charges.c.description,
        cast(null(), String).label("external_transaction_id"),
        charges.c.created_at,
    ).where(charges.c.account_id == account_id)
    credit_rows = select(
        credits.c.id,
        literal("credit"),
        credits.c.kind,
        credits.c.free_uses_delta,
        credits.c.paid_uses_delta,
        credits.c.amount_minor,
        credits.c.currency,
        credits.c.description,
        credits.c.external_transaction_id,
        credits.c.created_at,
    ).where(credits.c.account_id == account_id)
    ledger = union_all(charge_rows, credit_rows).subquery()
    page = await conn.execute(
        select(ledger)
        .order_by(ledger.c.created_at.desc(), ledger.c.transaction_id.desc())
        .limit(limit)
        .offset(offset)
    )
    total = await conn.scalar(select(func.count()).select_from(ledger))
    return list(page), int(total or 0)
