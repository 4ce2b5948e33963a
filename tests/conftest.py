"""Fixtures: every API test runs on a real SQLite file and on a real PostgreSQL database.

PostgreSQL comes from TEST_POSTGRES_URL (default: the local server, trust auth). Under CI=true
an unreachable PostgreSQL fails the run; elsewhere its tests are skipped with the reason shown.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
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

POSTGRES_ADMIN_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
TABLES = ", ".join(table.name for table in reversed(metadata.sorted_tables))


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


async def _pg_admin(sql: str) -> None:
    conn = await asyncpg.connect(POSTGRES_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session, dropped at the end."""
    name = f"ciris_billing_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        message = f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable: {exc!r}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: PostgreSQL tests must run)", pytrace=False)
        pytest.skip(message)
    url = _with_database(POSTGRES_ADMIN_URL, name)
    migrate_database(url)
    yield url
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    migrate_database(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "billing.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    asyncio.run(_truncate(url))
    return url


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
    return Settings(_env_file=None, database_url=database_url, **overrides)


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    # Floods of concurrent requests are what these tests send: room for them (test_limits.py
    # tests the limits themselves).
    settings = make_settings(database_url, rate_limit_account_per_minute=60_000)
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
