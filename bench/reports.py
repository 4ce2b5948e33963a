"""Time of the revenue and usage reports (issue 25 item 6: < 1 s over 1M charges).

    .venv/bin/python bench/reports.py [--charges 1000000] [--runs 5]

A scratch database on TEST_POSTGRES_URL's server (default: the local one), migrated and seeded
with SQL: ACCOUNTS = charges / 100 accounts, each with a paid lot (1000 for 150 uses, bought 91
days ago) and 100 one-use charges spread over the last 90 days naming that lot; one account in
ten has its lot voided at the end (breakage). Then each report is asked RUNS times after one
warm-up, in this process (the same functions the API calls): revenue per day over 90 days, per
month over 90 days, usage per day over 30 days, and the console overview's pair (30 days). It
prints the median and the max in ms. Not a test: figures to read. The database is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ciris_billing.cli import migrate_database  # noqa: E402
from ciris_billing.config import Settings  # noqa: E402
from ciris_billing.console import report_views  # noqa: E402
from ciris_billing.db import create_engine  # noqa: E402
from ciris_billing.reports import rollups  # noqa: E402

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = f"ciris_billing_bench_reports_{os.getpid()}"

SEED = """
INSERT INTO accounts (id, oauth_provider, external_id, plan_name, currency, status,
  free_uses_remaining, paid_uses_remaining, total_uses, last_charge_free_uses, created_at,
  updated_at)
SELECT 'acct_r_' || i, 'oauth:google', 'r' || i || '@example.com', 'paid', 'USD', 'active',
  0, 50, 150, 0, $1::timestamptz - interval '91 days', $1::timestamptz
FROM generate_series(1, $2::int) AS i;
INSERT INTO lots (id, account_id, kind, source, uses_granted, amount_minor, currency,
  cost_basis_minor, status, created_at)
SELECT 'lot_r_' || i, 'acct_r_' || i, 'paid', 'purchase', 150, 1000, 'USD', 6, 'active',
  $1::timestamptz - interval '91 days'
FROM generate_series(1, $2::int) AS i;
INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
  currency, metadata, lot_ids, lot_uses, created_at)
SELECT 'ch_r_' || i || '_' || j, 'acct_r_' || i, 1, 0, 1, 0, 'USD', '{}',
  ARRAY['lot_r_' || i], ARRAY[1::bigint],
  $1::timestamptz - interval '90 days' + (j * 90 * 86400 / 100 + i % 3600) * interval '1 second'
FROM generate_series(1, $2::int) AS i, generate_series(1, 100) AS j;
INSERT INTO credits (id, account_id, kind, free_uses_delta, paid_uses_delta, amount_minor,
  currency, lot_ids, lot_uses, created_at)
SELECT 'cr_r_' || i, 'acct_r_' || i, 'void', 0, -50, 0, 'USD', ARRAY['lot_r_' || i],
  ARRAY[-50::bigint], $1::timestamptz - interval '1 hour'
FROM generate_series(1, $2::int) AS i WHERE i % 10 = 0;
ANALYZE
"""


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def seed(url: str, accounts: int, now: datetime) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in SEED.split(";\n"):
            if statement.strip():
                await conn.execute(statement, *([now, accounts] if "$2" in statement else []))
    finally:
        await conn.close()


async def timed(runs: int, work: Callable[[], Awaitable[object]]) -> list[float]:
    await work()
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        await work()
        timings.append((time.perf_counter() - started) * 1000)
    return timings


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--charges", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the database (to explain)")
    args = parser.parse_args()
    now = datetime.now(UTC)
    await admin(f'CREATE DATABASE "{DB}"')
    url = f"{ADMIN_URL.rpartition('/')[0]}/{DB}"
    results: list[tuple[str, list[float]]] = []
    try:
        await asyncio.to_thread(migrate_database, url)
        started = time.perf_counter()
        await seed(url, max(args.charges // 100, 1), now)
        print(f"seeded {args.charges:,} charges in {time.perf_counter() - started:.1f} s")
        engine = create_engine(Settings(_env_file=None, database_url=url, jobs_enabled=False))
        today = now.date()
        first90, first30 = today - timedelta(days=89), today - timedelta(days=29)
        try:
            async with engine.begin() as conn:
                started = time.perf_counter()
                days = await rollups.roll(conn)
                took = time.perf_counter() - started
                print(f"rolled up {days:,} closed days in {took:.2f} s (the job's work, once)")
            async with engine.connect() as conn:
                cases: list[tuple[str, Callable[[], Awaitable[object]]]] = [
                    (
                        "revenue per day, 90 days",
                        lambda: rollups.revenue_report(conn, "USD", first90, today, "day"),
                    ),
                    (
                        "revenue per month, 90 days",
                        lambda: rollups.revenue_report(conn, "USD", first90, today, "month"),
                    ),
                    (
                        "usage per day, 30 days",
                        lambda: rollups.usage_report(conn, first30, today, "day"),
                    ),
                    (
                        "console overview's reports, 30 days",
                        lambda: report_views.reports(conn, "USD", first30, today, "day"),
                    ),
                ]
                for name, work in cases:
                    results.append((name, await timed(args.runs, work)))
        finally:
            await engine.dispose()
    finally:
        if args.keep:
            print(f"kept database {DB}")
        else:
            await admin(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    print(f"\nReports over {args.charges:,} charges, {args.runs} runs each (ms): median / max")
    for name, timings in results:
        print(f"  {name:<40} {statistics.median(timings):8.1f} {max(timings):8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
