"""The hot path's statements find their rows through indexes, even on a new installation.

Found by the benchmark (issue 13): a capture on a fresh database planned `UPDATE reservations
... WHERE id = $1` as a sequential scan (the table was empty when the plan was made), and the
connection kept that plan while the table grew, so every capture read every reservation ever
made: its latency and the database's CPU per capture grew for as long as the run lasted (p99
536 ms after a minute). The same held for the accounts a check or charge reads, and for the
idempotency keys and charges a keyed request looks up. Each statement is explained here on a
connection of the hot path's own pool, against empty tables that autovacuum has already
analysed (as it does on a new installation after its first rows), and no plan may scan a table.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from ciris_billing.accounts.hot import holds, reader, writer
from ciris_billing.accounts.hot.pool import StatementPool
from ciris_billing.db import create_engine, session_settings
from tests.support.api import make_settings

NOW = datetime(2026, 12, 7, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
WHO = ("oauth:google", "plans@example.com")
# Each hot statement with parameters of the shape the service sends (keyed where it can be).
STATEMENTS: dict[str, tuple[str, tuple[Any, ...]]] = {
    "check": (reader.CHECK_SQL, WHO),
    "checks": (reader.BATCH_SQL, ([WHO[0]], [WHO[1]])),
    "charge": (
        writer.CHARGE_SQL,
        (*WHO, 1, "key-1", "ch_1", 100, "USD", None, "{}", "fp", NOW, "key_1"),
    ),
    "charges": (
        writer.BATCH_SQL,
        tuple([v] for v in (*WHO, 1, "key-1", "ch_1", 100, "USD", None, "{}", "fp", NOW, "key_1")),
    ),
    "hold": (holds.HOLD_SQL, (*WHO, 1, "res_1", "key_1", "{}", NOW, LATER, "key-2", "fp")),
    "holds": (
        holds.HOLD_BATCH_SQL,
        tuple([v] for v in (*WHO, 1, "res_1", "key_1", "{}", NOW, LATER, "key-2", "fp")),
    ),
    "capture": (
        holds.CAPTURE_SQL,
        ("res_1", None, "ch_2", NOW, 100, None, "{}", "key_1", "cr_1", "key-3", "fp"),
    ),
    "captures": (
        holds.CAPTURE_BATCH_SQL,
        tuple(
            [v]
            for v in ("res_1", None, "ch_2", NOW, 100, None, "{}", "key_1", "cr_1", "key-3", "fp")
        ),
    ),
    "answer recorded": (holds.RECORD_SQL, ("key_1", "key-3", 201, "{}")),
    "answers recorded": (holds.RECORD_BATCH_SQL, (["key_1"], ["key-3"], [201], ["{}"])),
}


@pytest.fixture
async def hot_pool(fresh_database: str) -> AsyncIterator[StatementPool]:
    """A pool opened as the app opens it (app.py), on a new, empty installation."""
    settings = make_settings(fresh_database)
    engine = create_engine(settings)
    async with engine.connect() as conn:
        # What autovacuum does soon after the first rows: the tables are known to be small.
        await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(
            text("VACUUM ANALYZE")
        )
    pool = await StatementPool.open(engine, 1, session_settings(settings))
    try:
        yield pool
    finally:
        await pool.close()
        await engine.dispose()


@pytest.mark.parametrize("name", list(STATEMENTS))
async def test_no_hot_statement_scans_a_table_on_a_new_installation(
    hot_pool: StatementPool, name: str
) -> None:
    sql, parameters = STATEMENTS[name]
    plan = "\n".join(row[0] for row in await hot_pool.fetch_all(f"EXPLAIN {sql}", parameters))
    assert "Seq Scan" not in plan, plan
