"""Migrations build exactly the schema the code declares."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text

from ciris_billing.audit import audit
from ciris_billing.db import create_engine, in_our_models, metadata
from tests.support.postgres import pg_admin, with_database


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_name": in_our_models}
    )
    return list(compare_metadata(context, metadata))


async def test_models_match_migrations(database_url: str) -> None:
    engine = create_engine(database_url)
    async with engine.connect() as conn:
        differences = await conn.run_sync(_diff)
    await engine.dispose()
    assert differences == []


async def test_upgrading_a_database_that_holds_data(postgres_admin_url: str) -> None:
    """Later migrations alter tables that hold rows: the rows (and foreign keys) must survive."""
    name = f"ciris_billing_upgrade_{uuid.uuid4().hex[:8]}"
    await pg_admin(postgres_admin_url, f'CREATE DATABASE "{name}"')
    try:
        await _upgrade_with_data(with_database(postgres_admin_url, name))
    finally:
        await pg_admin(postgres_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _upgrade_with_data(url: str) -> None:
    await asyncio.to_thread(_upgrade, url, "0002")
    engine = create_engine(url)
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO accounts (id, oauth_provider, external_id, plan_name, currency, "
                "status, free_uses_remaining, paid_uses_remaining, total_uses, "
                "last_charge_free_uses, created_at, updated_at) VALUES ('acct_old', "
                "'oauth:google', 'old@example.com', 'free', 'USD', 'active', 2, 0, 1, 1, :t, :t)"
            ),
            {"t": now},
        )
        await conn.execute(
            text(
                "INSERT INTO credits (id, account_id, kind, free_uses_delta, paid_uses_delta, "
                "amount_minor, currency, created_at) VALUES "
                "('cr_old', 'acct_old', 'free_grant', 3, 0, 0, 'USD', :t)"
            ),
            {"t": now},
        )
        await conn.execute(
            text(
                "INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, "
                "amount_minor, currency, metadata, created_at) VALUES "
                "('ch_old', 'acct_old', 1, 1, 0, 100, 'USD', '{}', :t)"
            ),
            {"t": now},
        )
        # Stripe's words, as purchases stored them before 0006 mapped them to ours.
        for index, status in enumerate(OLD_TO_NEW_STATUS):
            await conn.execute(
                text(
                    "INSERT INTO purchases (id, account_id, provider, payment_id, amount_minor, "
                    "currency, uses, status, created_at, updated_at) VALUES "
                    "(:id, 'acct_old', 'sandbox', :payment_id, 500, 'USD', 20, :status, :t, :t)"
                ),
                {
                    "id": f"pur_old_{index}",
                    "payment_id": f"pi_old_{index}",
                    "status": status,
                    "t": now,
                },
            )
    await engine.dispose()
    await asyncio.to_thread(_upgrade, url, "head")
    engine = create_engine(url)
    async with engine.connect() as conn:
        report = await audit(conn)
        held = await conn.scalar(text("SELECT held_uses FROM accounts WHERE id = 'acct_old'"))
        rows = await conn.execute(text("SELECT payment_id, status FROM purchases"))
        statuses = {row.payment_id: row.status for row in rows}
    await engine.dispose()
    assert report.accounts_checked == 1
    assert report.clean
    assert held == 0
    assert statuses == {
        f"pi_old_{index}": new for index, new in enumerate(OLD_TO_NEW_STATUS.values())
    }


OLD_TO_NEW_STATUS = {
    "requires_payment_method": "pending",
    "requires_confirmation": "pending",
    "requires_action": "requires_action",
    "processing": "processing",
    "requires_capture": "processing",
    "succeeded": "succeeded",
    "failed": "failed",
    "canceled": "canceled",
}


def _upgrade(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "ciris_billing:migrations")
    config.attributes["database_url"] = url
    command.upgrade(config, revision)
