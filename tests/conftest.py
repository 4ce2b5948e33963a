"""Fixtures: every API test runs on a real PostgreSQL database.

The server is TEST_POSTGRES_URL's (default: the local one, trust auth) when it answers, else an
embedded PostgreSQL (ciris_billing.embedded) started for the test session in a temporary folder
and stopped at its end: `make test` needs no PostgreSQL installed. Nothing is skipped for want
of a database.
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing.audit import AuditReport, audit
from ciris_billing.cli import migrate_database
from ciris_billing.config import Settings
from ciris_billing.db import create_engine, metadata
from ciris_billing.deps import AppState
from ciris_billing.embedded import embedded_postgres, run_to_end

TEST_POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TABLES = ", ".join(table.name for table in reversed(metadata.sorted_tables))
# A URL for apps that are built but never started (their OpenAPI, their routes): nothing there.
UNUSED_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/unused"


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def pg_admin(admin_url: str, sql: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@functools.cache
def _test_postgres_problem() -> str | None:
    """Why TEST_POSTGRES_URL does not answer (None: it does)."""
    try:
        run_to_end(pg_admin(TEST_POSTGRES_URL, "SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return repr(exc)
    return None


def pytest_report_header() -> str:
    problem = _test_postgres_problem()
    if problem is None:
        return f"postgresql: {TEST_POSTGRES_URL} (TEST_POSTGRES_URL)"
    return f"postgresql: embedded for this session ({TEST_POSTGRES_URL} unreachable: {problem})"


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    """A server's admin URL (may create and drop databases): TEST_POSTGRES_URL's when it
    answers, else an embedded server in a temporary folder, stopped and removed at the end."""
    if _test_postgres_problem() is None:
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
        pool.submit(migrate_database, _with_database(postgres_admin_url, template)).result()
    counter = itertools.count(1)

    def make() -> str:
        name = f"{prefix}_{next(counter)}"
        sql = f'CREATE DATABASE "{name}" TEMPLATE "{template}"'
        run_to_end(pg_admin(postgres_admin_url, sql))
        made.append(name)
        return _with_database(postgres_admin_url, name)

    try:
        yield make
    finally:
        for name in reversed(made):
            sql = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
            run_to_end(pg_admin(postgres_admin_url, sql))


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
    run_to_end(_truncate(postgres_url))
    return postgres_url


async def _truncate(url: str) -> None:
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {TABLES} CASCADE"))
    await engine.dispose()


@dataclass
class Api:
    """An HTTP client on the app, with one API key of each scope."""

    http: httpx.AsyncClient
    engine: AsyncEngine
    keys: dict[str, str]
    settings: Settings
    state: AppState

    @property
    def database_url(self) -> str:
        url = self.settings.database_url
        assert url is not None, "tests always name their database"
        return url

    def headers(self, scope: str = "write", **extra: str) -> dict[str, str]:
        return {"X-API-Key": self.keys[scope], **extra}

    async def post(
        self, path: str, body: Any, scope: str = "write", **headers: str
    ) -> httpx.Response:
        return await self.http.post(path, json=body, headers=self.headers(scope, **headers))

    async def get(self, path: str, scope: str = "read", **params: Any) -> httpx.Response:
        return await self.http.get(path, params=params, headers=self.headers(scope))

    async def audit(self) -> AuditReport:
        async with self.engine.connect() as conn:
            return await audit(conn)


def make_settings(database_url: str, **overrides: Any) -> Settings:
    # In-process apps run no background jobs unless a test asks (tests/webhooks/test_jobs.py).
    overrides.setdefault("jobs_enabled", False)
    return Settings(_env_file=None, database_url=database_url, **overrides)


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
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        engine: AsyncEngine = app.state.billing.engine
        keys: dict[str, str] = {}
        async with engine.begin() as conn:
            for scope in auth.SCOPES:
                _key_id, keys[scope] = await auth.create_key(
                    conn, f"test-{scope}", frozenset({scope})
                )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
            yield Api(
                http=http, engine=engine, keys=keys, settings=settings, state=app.state.billing
            )


def identity(external_id: str = "user@example.com") -> dict[str, str]:
    return {"oauth_provider": "oauth:google", "external_id": external_id}
