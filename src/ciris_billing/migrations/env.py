"""Alembic environment: runs migrations on the async engine (PostgreSQL)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from ciris_billing.config import get_settings
from ciris_billing.db import create_engine, in_our_models, metadata

config = context.config


def _database_url() -> str:
    url = config.attributes.get("database_url") or get_settings().database_url
    if url is None:
        raise SystemExit("DATABASE_URL is not set (`ciris-billing migrate` starts an embedded one)")
    return str(url)


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        include_name=in_our_models,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_engine(_database_url())
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit(
        "Offline (SQL script) migrations are not supported; run them against a database"
    )
asyncio.run(_run_async())
