"""The database turns read-only under the service (what a failover does to the old primary: the
connections still reach it, and it now refuses every write with SQLSTATE 25006).

Played on a database of the test's own: `default_transaction_read_only` on, and its open
connections ended, so the pools reconnect and meet a read-only server; then off again. While it
is read-only, every write answers 503 database_unavailable with Retry-After (a retry will reach
the new primary), never a 500, on the fast path (charges: raw asyncpg) and the framework's
routes (accounts, purchases: SQLAlchemy); /health says read_only. Then, with the server
writable again, the very next requests succeed: the read-only connections were dropped, not
kept in the pools.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

from tests.support.api import Api, identity, make_settings, running_app
from tests.support.postgres import pg_admin

UNAVAILABLE = {"error": "database_unavailable", "detail": "The database is unreachable; retry"}


@pytest.fixture
async def api_on_own_database(fresh_database: str) -> AsyncIterator[Api]:
    settings = make_settings(fresh_database, rate_limit_account_per_minute=60_000)
    async with running_app(settings) as api:
        yield api


async def _read_only(admin_url: str, database: str, on: bool) -> None:
    await pg_admin(
        admin_url,
        f'ALTER DATABASE "{database}" SET default_transaction_read_only = {"on" if on else "off"}',
    )


async def _end_connections(admin_url: str, database: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await conn.close()


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json() == UNAVAILABLE
    assert response.headers["Retry-After"] == "1"


async def test_a_read_only_database_answers_503_and_its_connections_are_dropped(
    api_on_own_database: Api, postgres_admin_url: str
) -> None:
    api = api_on_own_database
    database = urlsplit(api.database_url).path.lstrip("/")
    # Both pools hold connections to the writable server.
    before = await asyncio.gather(
        *(api.post("/v1/billing/charges", identity(f"before-{n}@x.y")) for n in range(6))
    )
    assert {r.status_code for r in before} == {201}
    assert (await api.post("/v1/billing/accounts", identity("acct-before@x.y"))).status_code == 201

    await _read_only(postgres_admin_url, database, on=True)
    try:
        await _end_connections(postgres_admin_url, database)
        # Lost connections first, then new ones to a read-only server: 503 + Retry-After.
        for _ in range(3):
            charges = await asyncio.gather(
                *(api.post("/v1/billing/charges", identity(f"during-{n}@x.y")) for n in range(6))
            )
            for response in charges:
                _assert_unavailable(response)
            _assert_unavailable(await api.post("/v1/billing/accounts", identity("acct@x.y")))
            purchase = await api.post(
                "/v1/billing/purchases", {**identity("before-0@x.y"), "customer_email": "b@x.y"}
            )
            _assert_unavailable(purchase)
        health = await api.http.get("/health")
        assert health.status_code == 503
        assert health.json() == {"status": "unavailable", "database": "read_only"}
        assert health.headers["Retry-After"] == "1"
    finally:
        await _read_only(postgres_admin_url, database, on=False)

    # Writable again: no read-only connection was kept, so nothing answers 503 any more.
    after = await asyncio.gather(
        *(api.post("/v1/billing/charges", identity(f"after-{n}@x.y")) for n in range(6))
    )
    # (A connection opened during the read-only phase for a read, which went back to its pool
    # without an error, once answered one of these 503: the next test reproduces it.)
    assert [r.status_code for r in after] == [201] * 6, [r.text for r in after]
    assert (await api.post("/v1/billing/accounts", identity("acct-after@x.y"))).status_code == 201
    purchase = await api.post(
        "/v1/billing/purchases", {**identity("before-0@x.y"), "customer_email": "b@x.y"}
    )
    assert purchase.status_code == 201, purchase.text
    assert (await api.http.get("/health")).json()["database"] == "ok"
    report = await api.audit()
    assert report.clean, report
    # Nothing was charged by a 503: six before, six after.
    ledger = await api.get("/v1/billing/transactions", **identity("during-0@x.y"))
    assert ledger.status_code == 404 or ledger.json()["total"] == 0


async def test_a_connection_opened_while_read_only_is_not_kept_once_writable(
    fresh_database: str, postgres_admin_url: str
) -> None:
    """A read-only server still answers reads, so a connection opened to it can serve a read and
    go back to its pool with no error that would drop it; its session stays read-only after
    the server is writable again (a session keeps the read-only default it started with). Such
    a connection is replaced when next taken, so the first write after answers 201, not 503.
    One connection per pool: the connection a read left there is the one the write gets."""
    database = urlsplit(fresh_database).path.lstrip("/")
    settings = make_settings(fresh_database, db_pool_size=1)
    async with running_app(settings) as api:
        before = identity("reader@x.y")
        assert (await api.post("/v1/billing/charges", before)).status_code == 201
        await _read_only(postgres_admin_url, database, on=True)
        try:
            await _end_connections(postgres_admin_url, database)
            # Reads succeed on the read-only server: the hot path's check and the framework's
            # ledger, each on a connection opened now.
            check = await api.post("/v1/billing/credits/check", before)
            assert check.status_code == 200, check.text
            ledger = await api.get("/v1/billing/transactions", **before)
            assert ledger.status_code == 200, ledger.text
        finally:
            await _read_only(postgres_admin_url, database, on=False)
        # The very first writes on each pool succeed.
        charge = await api.post("/v1/billing/charges", before)
        assert charge.status_code == 201, charge.text
        created = await api.post("/v1/billing/accounts", identity("new-after@x.y"))
        assert created.status_code == 201, created.text
        report = await api.audit()
        assert report.clean, report
