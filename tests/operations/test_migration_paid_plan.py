"""Issue 21 finding 15, existing installations: accounts that paid before plan_name became
`paid` on paid uses are moved to `paid` by a migration (so the default balance.low applies)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from sqlalchemy import text

from ciris_billing.audit import audit
from ciris_billing.db import create_engine
from tests.operations.test_migrations import _upgrade
from tests.support.postgres import pg_admin, with_database

BEFORE = "20261207_portal_revocations"

# account id -> (plan_name before, its credits as (kind, free delta, paid delta), plan after)
ACCOUNTS: dict[str, tuple[str, list[tuple[str, int, int]], str]] = {
    "acct_bought": ("free", [("free_grant", 3, 0), ("purchase", 0, 20)], "paid"),
    "acct_granted": ("free", [("free_grant", 3, 0), ("grant", 0, 5)], "paid"),
    "acct_initial": ("free", [("free_grant", 3, 0), ("initial_balance", 0, 10)], "paid"),
    "acct_refunded": ("free", [("purchase", 0, 20), ("refund", 0, -20)], "paid"),
    "acct_never_paid": ("free", [("free_grant", 3, 0)], "free"),
    "acct_own_plan": ("pro", [("purchase", 0, 20)], "pro"),
}


async def test_accounts_that_paid_before_plan_name_followed_paid_uses_become_paid(
    postgres_admin_url: str,
) -> None:
    name = f"ciris_billing_paidplan_{uuid.uuid4().hex[:8]}"
    await pg_admin(postgres_admin_url, f'CREATE DATABASE "{name}"')
    try:
        url = with_database(postgres_admin_url, name)
        await asyncio.to_thread(_upgrade, url, BEFORE)
        await _accounts_as_before(url)
        await asyncio.to_thread(_upgrade, url, "head")
        engine = create_engine(url)
        async with engine.connect() as conn:
            plans: dict[str, str] = dict(
                (await conn.execute(text("SELECT id, plan_name FROM accounts"))).all()
            )
            report = await audit(conn)
        await engine.dispose()
    finally:
        await pg_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    assert plans == {account_id: after for account_id, (_, _, after) in ACCOUNTS.items()}
    assert report.accounts_checked == len(ACCOUNTS)
    assert report.clean


async def _accounts_as_before(url: str) -> None:
    engine = create_engine(url)
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        for account_id, (plan, credited, _) in ACCOUNTS.items():
            await conn.execute(
                text(
                    "INSERT INTO accounts (id, oauth_provider, external_id, plan_name, currency, "
                    "status, free_uses_remaining, paid_uses_remaining, total_uses, "
                    "last_charge_free_uses, created_at, updated_at) VALUES (:id, "
                    "'oauth:google', :id, :plan, 'USD', 'active', :free, :paid, 0, 0, :t, :t)"
                ),
                {
                    "id": account_id,
                    "plan": plan,
                    "free": sum(free for _, free, _ in credited),
                    "paid": sum(paid for _, _, paid in credited),
                    "t": now,
                },
            )
            for index, (kind, free, paid) in enumerate(credited):
                payment_id = f"pi_{account_id}" if kind == "purchase" else None
                if payment_id is not None:  # a credited purchase, as the audit expects
                    await conn.execute(
                        text(
                            "INSERT INTO purchases (id, account_id, provider, payment_id, "
                            "amount_minor, currency, uses, status, credited_at, created_at, "
                            "updated_at) VALUES (:id, :account_id, 'sandbox', :payment_id, 500, "
                            "'USD', :paid, 'succeeded', :t, :t, :t)"
                        ),
                        {
                            "id": f"pur_{account_id}",
                            "account_id": account_id,
                            "payment_id": payment_id,
                            "paid": paid,
                            "t": now,
                        },
                    )
                await conn.execute(
                    text(
                        "INSERT INTO credits (id, account_id, kind, free_uses_delta, "
                        "paid_uses_delta, amount_minor, currency, external_transaction_id, "
                        "created_at) VALUES (:id, :account_id, :kind, :free, :paid, 0, 'USD', "
                        ":payment_id, :t)"
                    ),
                    {
                        "id": f"cr_{account_id}_{index}",
                        "account_id": account_id,
                        "kind": kind,
                        "free": free,
                        "paid": paid,
                        "payment_id": payment_id,
                        "t": now,
                    },
                )
    await engine.dispose()
