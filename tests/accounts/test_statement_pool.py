"""The hot path's statement pool keeps its own asyncpg connections (accounts/hot/pool.py): they
are used again while they are sound, and never once they may lead somewhere wrong: after an
error that says the server went away or turned read-only, after sitting idle too long, or once
the pool is closed. Real PostgreSQL; the backends are told apart by their pids."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import text

from ciris_billing.accounts.hot import pool as pool_module
from ciris_billing.accounts.hot.pool import StatementPool
from tests.support.api import Api

PID = "SELECT pg_backend_pid() AS pid, pg_sleep($1::float8) AS slept"
# A statement the server refuses as a read-only server would (SQLSTATE 25006).
READ_ONLY_ERROR = (
    "DO $$ BEGIN RAISE EXCEPTION 'read only' USING ERRCODE = 'read_only_sql_transaction'; END $$"
)


async def pids(pool: StatementPool) -> set[int]:
    """The backends of two statements sent at once (so both connections are in use)."""
    rows = await asyncio.gather(*(pool.fetch_one(PID, (0.05,), read=True) for _ in range(2)))
    return {row["pid"] for row in rows if row is not None}


async def alive(api: Api, backends: set[int]) -> set[int]:
    async with api.engine.connect() as conn:
        query = text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids)")
        rows = await conn.execute(query, {"pids": list(backends)})
        return {row.pid for row in rows}


async def test_connections_are_used_again(statement_pool: StatementPool) -> None:
    first = await pids(statement_pool)
    assert len(first) == 2
    assert await pids(statement_pool) == first


async def test_after_a_read_only_refusal_no_connection_opened_before_is_used_again(
    api: Api, statement_pool: StatementPool
) -> None:
    before = await pids(statement_pool)

    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await statement_pool.fetch_one(READ_ONLY_ERROR, ())

    after = await pids(statement_pool)
    assert not after & before, "a failover's demoted server: every pooled connection replaced"
    for _ in range(50):  # closed, not left open on the server
        if not await alive(api, before):
            break
        await asyncio.sleep(0.1)
    assert not await alive(api, before)


async def test_a_connection_idle_too_long_is_replaced(
    statement_pool: StatementPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = await pids(statement_pool)
    monkeypatch.setattr(pool_module, "IDLE_SECONDS", 0.0)
    await asyncio.sleep(0.01)

    assert not await pids(statement_pool) & before


async def test_closing_the_pool_closes_its_connections(
    api: Api, statement_pool: StatementPool
) -> None:
    before = await pids(statement_pool)
    assert await alive(api, before) == before

    await statement_pool.close()

    for _ in range(50):
        if not await alive(api, before):
            break
        await asyncio.sleep(0.1)
    assert not await alive(api, before)
