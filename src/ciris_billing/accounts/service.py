"""The billing rules: accounts, credit checks, charges and the ledger.

Functions here take an open connection inside the caller's transaction and never commit.
Every change to a counter writes its ledger row in that same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, String, case, cast, func, literal, null, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts, charges, credits, insert_or_ignore, new_id, utcnow
from ciris_billing.errors import AccountNotFound, AccountSuspended, PurchaseRequired
from ciris_billing.ledger import write_credit
from ciris_billing.pricing import Pricing

NO_USES_LEFT = "No free uses or credits remaining"


@dataclass(frozen=True, slots=True)
class Identity:
    oauth_provider: str
    external_id: str


@dataclass(frozen=True, slots=True)
class NewAccount:
    """What a caller may set when an account is created (ignored when it already exists)."""

    initial_paid_uses: int = 0
    currency: str | None = None
    plan_name: str = "free"
    customer_email: str | None = None
    display_name: str | None = None


def _identity_clause(identity: Identity) -> Any:
    return (accounts.c.oauth_provider == identity.oauth_provider) & (
        accounts.c.external_id == identity.external_id
    )


async def find_account(conn: AsyncConnection, identity: Identity) -> Row[Any] | None:
    result = await conn.execute(select(accounts).where(_identity_clause(identity)))
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
    inserted = await conn.execute(
        insert_or_ignore(conn, accounts)
        .values(
            id=account_id,
            oauth_provider=identity.oauth_provider,
            external_id=identity.external_id,
            customer_email=new.customer_email,
            display_name=new.display_name,
            plan_name=new.plan_name,
            currency=currency,
            status="active",
            free_uses_remaining=pricing.free_uses_per_account,
            paid_uses_remaining=new.initial_paid_uses,
            total_uses=0,
            last_charge_free_uses=0,
            created_at=now,
            updated_at=now,
        )
        .returning(accounts.c.id)
    )
    created = inserted.first() is not None
    if created:
        if pricing.free_uses_per_account:
            await write_credit(
                conn,
                account_id=account_id,
                kind="free_grant",
                currency=currency,
                free=pricing.free_uses_per_account,
                description="Free uses for a new account",
            )
        if new.initial_paid_uses:
            await write_credit(
                conn,
                account_id=account_id,
                kind="initial_balance",
                currency=currency,
                paid=new.initial_paid_uses,
                description="Initial balance",
            )
    return await get_account(conn, identity), created


@dataclass(frozen=True, slots=True)
class CreditStatus:
    has_credit: bool
    credits_remaining: int
    plan_name: str
    reason: str | None
    free_uses_remaining: int
    total_uses: int
    purchase_required: bool
    purchase_price_minor: int | None
    purchase_uses: int | None


def credit_status(account: Row[Any], pricing: Pricing) -> CreditStatus:
    free = int(account.free_uses_remaining)
    paid = int(account.paid_uses_remaining)
    has_credit = account.status == "active" and free + paid > 0
    if account.status != "active":
        reason: str | None = "Account is suspended" + (
            f": {account.status_reason}" if account.status_reason else ""
        )
    else:
        reason = None if has_credit else NO_USES_LEFT
    purchase_required = account.status == "active" and not has_credit
    return CreditStatus(
        has_credit=has_credit,
        credits_remaining=paid,
        plan_name=account.plan_name,
        reason=reason,
        free_uses_remaining=free,
        total_uses=int(account.total_uses),
        purchase_required=purchase_required,
        purchase_price_minor=pricing.price_per_purchase_minor if purchase_required else None,
        purchase_uses=pricing.paid_uses_per_purchase if purchase_required else None,
    )


async def check_credit(conn: AsyncConnection, identity: Identity, pricing: Pricing) -> CreditStatus:
    account = await find_account(conn, identity)
    if account is None:
        account, _ = await ensure_account(conn, identity, pricing)
    return credit_status(account, pricing)


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    uses: int
    amount_minor: int
    currency: str
    description: str | None
    metadata: dict[str, Any]
    idempotency_key: str | None


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


def _deduct_statement(identity: Identity, uses: int) -> Any:
    """One conditional UPDATE that spends `uses`, free ones first.

    Correct under concurrency by construction: the WHERE clause re-checks the balance on the
    locked row, so two charges can never both spend the last use (no read-modify-write in
    Python). Every SET expression sees the row's old values, which is how
    `last_charge_free_uses` records the free/paid split for RETURNING.
    """
    free = accounts.c.free_uses_remaining
    paid = accounts.c.paid_uses_remaining
    enough_free = free >= uses
    return (
        accounts.update()
        .where(
            _identity_clause(identity),
            accounts.c.status == "active",
            free + paid >= uses,
        )
        .values(
            last_charge_free_uses=case((enough_free, uses), else_=free),
            free_uses_remaining=case((enough_free, free - uses), else_=0),
            paid_uses_remaining=case((enough_free, paid), else_=paid - (uses - free)),
            total_uses=accounts.c.total_uses + uses,
            updated_at=utcnow(),
        )
        .returning(
            accounts.c.id,
            accounts.c.free_uses_remaining,
            accounts.c.paid_uses_remaining,
            accounts.c.total_uses,
            accounts.c.last_charge_free_uses,
            accounts.c.plan_name,
        )
    )


async def charge(
    conn: AsyncConnection, identity: Identity, request: ChargeRequest, pricing: Pricing
) -> Charge:
    """Spend uses (free first, then paid) and write the charge's ledger row, or refuse with 402."""
    deducted = (await conn.execute(_deduct_statement(identity, request.uses))).first()
    if deducted is None:
        account, created = await ensure_account(conn, identity, pricing)
        if created:
            deducted = (await conn.execute(_deduct_statement(identity, request.uses))).first()
        if deducted is None:
            if account.status != "active":
                raise AccountSuspended("This account is suspended; charges are refused")
            raise PurchaseRequired(
                NO_USES_LEFT,
                purchase_required=True,
                purchase_price_minor=pricing.price_per_purchase_minor,
                purchase_uses=pricing.paid_uses_per_purchase,
                currency=pricing.currency,
                free_uses_remaining=int(account.free_uses_remaining),
                credits_remaining=int(account.paid_uses_remaining),
                uses_requested=request.uses,
            )
    free_used = int(deducted.last_charge_free_uses)
    now = utcnow()
    charge_id = new_id("ch")
    await conn.execute(
        charges.insert().values(
            id=charge_id,
            account_id=deducted.id,
            uses=request.uses,
            free_uses_used=free_used,
            paid_uses_used=request.uses - free_used,
            amount_minor=request.amount_minor,
            currency=request.currency,
            description=request.description,
            metadata=request.metadata,
            idempotency_key=request.idempotency_key,
            created_at=now,
        )
    )
    return Charge(
        charge_id=charge_id,
        account_id=deducted.id,
        uses=request.uses,
        free_uses_used=free_used,
        paid_uses_used=request.uses - free_used,
        amount_minor=request.amount_minor,
        currency=request.currency,
        description=request.description,
        metadata=request.metadata,
        free_uses_remaining=int(deducted.free_uses_remaining),
        credits_remaining=int(deducted.paid_uses_remaining),
        total_uses=int(deducted.total_uses),
        plan_name=deducted.plan_name,
        created_at=now.isoformat(),
    )


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
