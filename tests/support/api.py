"""The in-process app as tests drive it: settings, an HTTP client with a key of each scope."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing.audit import AuditReport, audit
from ciris_billing.config import Settings
from ciris_billing.deps import AppState

# Under CI=true nothing mandatory may skip (e.g. for want of Chromium).
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# A URL for apps that are built but never started (their OpenAPI, their routes): nothing there.
UNUSED_DATABASE_URL = "postgresql://postgres@127.0.0.1:1/unused"


def make_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings from these values alone (no `.env`)."""
    # In-process apps run no background jobs unless a test asks (tests/webhooks/test_jobs.py).
    overrides.setdefault("jobs_enabled", False)
    # Two test processes share one PostgreSQL that forks slowly when the machine is busy: a
    # connection that took over 5 s failed a test's start-up, not what it tests.
    overrides.setdefault("db_connect_timeout_seconds", 30.0)
    return Settings(_env_file=None, database_url=database_url, **overrides)


def identity(external_id: str = "user@example.com") -> dict[str, str]:
    return {"oauth_provider": "oauth:google", "external_id": external_id}


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


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[Api]:
    """The app started (its lifespan) with a fresh key of each scope, until the block ends."""
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
