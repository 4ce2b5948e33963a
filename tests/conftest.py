"""Fixtures: every API test runs on a real PostgreSQL database (helpers: tests/support/).

The server is TEST_POSTGRES_URL's (default: the local one, trust auth) when it answers, else an
embedded PostgreSQL (ciris_billing.embedded) started for the test session in a temporary folder
and stopped at its end: `make test` needs no PostgreSQL installed. Nothing is skipped for want
of a database.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ciris_billing.accounts.hot.pool import StatementPool
from ciris_billing.cli import migrate_database
from ciris_billing.embedded import embedded_postgres, run_to_end
from tests.support.api import Api, make_settings, running_app
from tests.support.postgres import (
    TEST_POSTGRES_URL,
    drop_databases,
    pg_admin,
    postgres_problem,
    truncate,
    with_database,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Soak tests run only with SOAK=1 (`make test` runs every other test, slow ones too)."""
    if os.environ.get("SOAK") == "1":
        return
    for item in items:
        if item.get_closest_marker("soak"):
            item.add_marker(pytest.mark.skip(reason="soak: runs with SOAK=1"))


def pytest_report_header() -> str:
    problem = postgres_problem()
    if problem is None:
        return f"postgresql: {TEST_POSTGRES_URL} (TEST_POSTGRES_URL)"
    return f"postgresql: embedded for this session ({TEST_POSTGRES_URL} unreachable: {problem})"


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A server's admin URL (may create and drop databases): TEST_POSTGRES_URL's when it
    answers, else an embedded server in a temporary folder, stopped and removed at the end."""
    if postgres_problem() is None:
        yield TEST_POSTGRES_URL
        return
    folder = Path(tempfile.mkdtemp(prefix="ciris-billing-test-pg-"))
    try:
        with embedded_postgres(folder / "pgdata", database="postgres") as server:
            yield server.url("postgres")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def new_database(postgres_admin_url: str) -> Iterator[Callable[[], str]]:
    """Makes migrated, empty databases (copies of one migrated template: a file copy, no
    migrations per database); every one is dropped at the end of the session."""
    prefix = f"ciris_billing_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    template = f"{prefix}_template"
    made = [template]
    run_to_end(pg_admin(postgres_admin_url, f'CREATE DATABASE "{template}"'))
    # On a thread: alembic runs its own event loop, and a test's may be running here.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(migrate_database, with_database(postgres_admin_url, template)).result()
    counter = itertools.count(1)

    def make() -> str:
        name = f"{prefix}_{next(counter)}"
        sql = f'CREATE DATABASE "{name}" TEMPLATE "{template}"'
        run_to_end(pg_admin(postgres_admin_url, sql))
        made.append(name)
        return with_database(postgres_admin_url, name)

    try:
        yield make
    finally:
        run_to_end(drop_databases(postgres_admin_url, made))


@pytest.fixture(scope="session")
def postgres_url(new_database: Callable[[], str]) -> str:
    """The session's migrated database (tests empty it as they need)."""
    return new_database()


@pytest.fixture
def fresh_database(new_database: Callable[[], str]) -> str:
    """A migrated, empty database of this test's own (for servers started in subprocesses)."""
    return new_database()


@pytest.fixture
def database_url(postgres_url: str) -> str:
    """The session's migrated database, emptied for this test."""
    run_to_end(truncate(postgres_url))
    return postgres_url


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    # Floods of concurrent requests are what these tests send: room for them (test_limits.py
    # tests the limits themselves).
    # Its client's host, billing.test, is allowed to build links (ALLOWED_HOSTS).
    settings = make_settings(
        database_url,
        rate_limit_account_per_minute=60_000,
        allowed_hosts=["localhost", "127.0.0.1", "[::1]", "billing.test"],
    )
    async with running_app(settings) as api:
        yield api


@pytest.fixture
async def statement_pool(api: Api) -> AsyncIterator[StatementPool]:
    """The hot path's statement pool (two connections) on `api`'s database, closed after."""
    pool = await StatementPool.open(api.engine, 2)
    try:
        yield pool
    finally:
        await pool.close()
