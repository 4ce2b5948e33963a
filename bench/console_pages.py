"""Server time of every console and portal page, with an account holding 10,000 ledger rows.

    .venv/bin/python bench/console_pages.py [--rows 10000] [--runs 20]

A scratch database on TEST_POSTGRES_URL's server (default: the local one), migrated and seeded
with SQL: one account with ROWS charges (and its grant, purchases, a refund), 2,000 other
accounts with a few charges each, 20 failed webhook events. The app runs in this process
(its own ASGI entry, as `serve` runs it); each page is requested RUNS times after three
warm-ups, signed in like a browser, and the time from request to the last byte of the answer
is printed (median, 95th percentile, max). The ledger and the portal's usage history are
paged by key: the deep pages (row 5,000 on) must cost what the first does. Target: < 200 ms.
Not a test (no timed assertion): figures to read. The scratch database is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from pathlib import Path

import asyncpg
import httpx
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ciris_billing import auth  # noqa: E402
from ciris_billing.app import create_app  # noqa: E402
from ciris_billing.cli import migrate_database  # noqa: E402
from ciris_billing.config import Settings  # noqa: E402
from ciris_billing.console.queries import encode_cursor  # noqa: E402
from ciris_billing.portal.links import portal_token  # noqa: E402

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
DB = "ciris_billing_bench_console"
HEAVY = "acct_bench_heavy"

SEED = """
INSERT INTO accounts (id, oauth_provider, external_id, customer_email, plan_name, currency,
  status, free_uses_remaining, paid_uses_remaining, total_uses, last_charge_free_uses,
  created_at, updated_at)
VALUES ($1, 'oauth:google', 'heavy@example.com', 'heavy@example.com', 'free', 'USD', 'active',
  0, 0, $2 + 3, 0, now() - interval '30 days', now());
INSERT INTO credits (id, account_id, kind, free_uses_delta, paid_uses_delta, amount_minor,
  currency, description, created_at)
VALUES ('cr_bench_free', $1, 'free_grant', 3, 0, 0, 'USD', 'Free uses', now() - interval '30 days'),
       ('cr_bench_grant', $1, 'grant', 0, $2, 0, 'USD', 'bench', now() - interval '30 days');
INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
  currency, description, metadata, created_at)
SELECT 'ch_bench_' || i, $1, 1, CASE WHEN i <= 3 THEN 1 ELSE 0 END,
  CASE WHEN i <= 3 THEN 0 ELSE 1 END, 0, 'USD', 'Interaction ' || i, '{}',
  now() - interval '29 days' + i * interval '1 second'
FROM generate_series(1, $2 + 3) AS i;
INSERT INTO purchases (id, account_id, provider, payment_id, amount_minor, currency, uses,
  status, created_at, updated_at, credited_at)
SELECT 'pur_bench_' || i, $1, 'sandbox', 'pi_sbx_bench_' || i, 500, 'USD', 20, 'succeeded',
  now() - interval '20 days', now(), now() - interval '20 days'
FROM generate_series(1, 10) AS i;
INSERT INTO accounts (id, oauth_provider, external_id, plan_name, currency, status,
  free_uses_remaining, paid_uses_remaining, total_uses, last_charge_free_uses, created_at,
  updated_at)
SELECT 'acct_bench_' || i, 'oauth:google', 'user' || i || '@example.com', 'free', 'USD',
  'active', 0, 0, 3, 0, now(), now()
FROM generate_series(1, 2000) AS i;
INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
  currency, metadata, created_at)
SELECT 'ch_bench_o_' || i || '_' || j, 'acct_bench_' || i, 1, 1, 0, 0, 'USD', '{}', now()
FROM generate_series(1, 2000) AS i, generate_series(1, 3) AS j;
INSERT INTO webhook_events (id, provider, event_id, type, payment_id, payload, received_at,
  attempts, last_error)
SELECT 'whe_bench_' || i, 'sandbox', 'evt_bench_' || i, 'payment_intent.succeeded',
  'pi_sbx_bench_' || i, '{}', now(), 2, 'ProviderUnavailable'
FROM generate_series(1, 20) AS i;
ANALYZE;
"""


def with_database(url: str, name: str) -> str:
    return f"{url.rpartition('/')[0]}/{name}"


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def seed(url: str, rows: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        for statement in SEED.split(";\n"):
            if statement.strip():
                used = 2 if "$2" in statement else 1 if "$1" in statement else 0
                await conn.execute(statement, *[HEAVY, rows - 3][:used])
    finally:
        await conn.close()


async def measure(url: str, runs: int, rows: int) -> list[tuple[str, list[float]]]:
    settings = Settings(_env_file=None, database_url=url, jobs_enabled=False)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state = app.state.billing
        async with state.engine.begin() as conn:
            _id, key = await auth.create_key(conn, "bench", frozenset({"admin"}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            form = await http.get("/console/login")
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
            assert csrf is not None
            signed = await http.post(
                "/console/login", data={"csrf_token": csrf.group(1), "api_key": key}
            )
            assert signed.status_code == 303, signed.text
            async with state.engine.connect() as conn:
                deep = (
                    await conn.execute(
                        text(
                            "SELECT created_at, id FROM charges WHERE account_id = :a "
                            "ORDER BY created_at DESC, id DESC OFFSET 5000 LIMIT 1"
                        ),
                        {"a": HEAVY},
                    )
                ).one()
            cursor = encode_cursor(deep.created_at, deep.id)
            token = portal_token(
                state.secrets.portal_link_secret, "oauth:google", "heavy@example.com"
            )
            pages = {
                "console overview": "/console",
                "console search (email)": "/console/accounts?q=HEAVY@example.com",
                f"console account ({rows:,} ledger rows), first page": f"/console/accounts/{HEAVY}",
                "console account, ledger page at row 5,000": (
                    f"/console/accounts/{HEAVY}?before={cursor}"
                ),
                "console webhook inbox": "/console/webhooks",
                "console outgoing webhooks": "/console/endpoints",
                "console API keys": "/console/keys",
                "console audit log": "/console/audit",
                "portal, first page": f"/v1/billing/portal/{token}",
                "portal, usage page at row 5,000": f"/v1/billing/portal/{token}?before={cursor}",
                "portal receipt (asks the provider)": (
                    f"/v1/billing/portal/{token}/receipts/pi_sbx_bench_1"
                ),
            }
            results = []
            for name, path in pages.items():
                timings = []
                for attempt in range(runs + 3):
                    started = time.perf_counter()
                    response = await http.get(path)
                    elapsed = (time.perf_counter() - started) * 1000
                    # The search redirects to the one account it found (303).
                    assert response.status_code in (200, 303), (name, response.status_code)
                    if attempt >= 3:
                        timings.append(elapsed)
                results.append((name, timings))
            return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    await admin(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    await admin(f'CREATE DATABASE "{DB}"')
    url = with_database(ADMIN_URL, DB)
    try:
        await asyncio.to_thread(migrate_database, url)
        await seed(url, args.rows)
        results = await measure(url, args.runs, args.rows)
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)')
    print(f"\nServer time per page, {args.runs} runs each (ms): median / p95 / max")
    for name, timings in results:
        ordered = sorted(timings)
        p95 = ordered[max(0, round(0.95 * len(ordered)) - 1)]
        print(f"  {name:<52} {statistics.median(ordered):7.1f} {p95:7.1f} {ordered[-1]:7.1f}")


if __name__ == "__main__":
    asyncio.run(main())
