"""Alembic environment: runs migrations on the async engine (PostgreSQL)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from ciris_billing.config import get_settings
from ciris_billing.db import create_engine, metadata

config = context.config


def _database_url() -> str:
    url = config.attributes.get("database_url") or get_settings().database_url
    if url is None:
        raise SystemExit("DATABASE_URL is not set (`ciris-billing migrate` starts an embedded one)")
    return str(url)


def _ours(name: str | None, type_: str, _parent: object) -> bool:
    """The job queue's own tables (procrastinate's, jobs.py) are not in our models."""
    return not (type_ == "table" and (name or "").startswith("procrastinate_"))


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        compare_type=True,
        include_name=_ours,
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
