"""The test PostgreSQL server: which one, admin statements, empty databases."""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterable

import asyncpg
from sqlalchemy import text

from ciris_billing.db import create_engine, metadata
from ciris_billing.embedded import run_to_end

TEST_POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
# Every table, children first: `TRUNCATE {TABLES} CASCADE` empties a database.
TABLES = ", ".join(table.name for table in reversed(metadata.sorted_tables))


def with_database(url: str, name: str) -> str:
    """`url` with its database name replaced by `name`."""
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def pg_admin(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def drop_databases(admin_url: str, names: Iterable[str]) -> None:
    """Drop these databases, all at once: each DROP waits for a checkpoint, and concurrent
    ones share it (one after another they took seconds each on a busy server)."""
    dropped = await asyncio.gather(
        *(pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)') for name in names),
        return_exceptions=True,
    )
    for outcome in dropped:
        if isinstance(outcome, BaseException):
            raise outcome


async def truncate(url: str) -> None:
    """Empty every table of the database at `url` (the schema stays)."""
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {TABLES} CASCADE"))
    finally:
        await engine.dispose()


@functools.cache
def postgres_problem() -> str | None:
    """Why TEST_POSTGRES_URL does not answer (None: it does)."""
    try:
        run_to_end(pg_admin(TEST_POSTGRES_URL, "SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return repr(exc)
    return None
