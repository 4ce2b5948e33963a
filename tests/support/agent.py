"""The agent client's test rig: the real app in process behind a `Network` that can fail, and
a real server process on a fixed port (tests/client)."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, TypeVar

import httpx
import pytest

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing_client import AsyncBillingClient
from tests.support.api import make_settings
from tests.support.cli import create_key
from tests.support.servers import free_port, running_service, service_env

GOOGLE = "oauth:google"
VISA = "4242 4242 4242 4242"
BASE = "http://billing.test"


class Backoff(TypedDict):
    backoff: float
    max_backoff: float


FAST: Backoff = {"backoff": 0.001, "max_backoff": 0.01}  # tests wait milliseconds, not seconds


class Network(httpx.AsyncBaseTransport):
    """Between the client and the real app: records requests; can be down (connection refused),
    lose responses after the app handled the request, or answer with a proxy's error."""

    def __init__(self, app_transport: httpx.AsyncBaseTransport) -> None:
        self.app = app_transport
        self.requests: list[httpx.Request] = []
        self.down = False
        self.lose_responses = 0
        self.proxy_errors: list[httpx.Response] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.proxy_errors:
            return self.proxy_errors.pop(0)
        response = await self.app.handle_async_request(request)
        if self.lose_responses:
            self.lose_responses -= 1
            await response.aread()
            raise httpx.ReadTimeout("response lost", request=request)
        return response

    def sent(self, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.path == path]


@dataclass
class InProcess:
    network: Network
    keys: dict[str, str]
    clients: list[AsyncBillingClient] = field(default_factory=list)

    def client(
        self,
        scope: str = "write",
        *,
        fail_open_grace_seconds: float | None = None,
        max_backoff: float = FAST["max_backoff"],
    ) -> AsyncBillingClient:
        client = AsyncBillingClient(
            BASE,
            self.keys[scope],
            transport=self.network,
            backoff=FAST["backoff"],
            max_backoff=max_backoff,
            fail_open_grace_seconds=fail_open_grace_seconds,
        )
        self.clients.append(client)
        return client

    async def confirm(self, payment_id: str, client_secret: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=self.network.app, base_url=BASE) as http:
            return await http.post(
                f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
                json={"client_secret": client_secret, "card_number": VISA},
            )


def user() -> str:
    return f"agent-{uuid.uuid4().hex[:10]}@example.com"


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


@dataclass
class Server:
    env: dict[str, str]
    key: str
    port: int
    logs: Path

    def run(self, name: str) -> contextlib.AbstractContextManager[str]:
        return running_service(self.env, self.logs / f"{name}.log", port=self.port)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


Rig = TypeVar("Rig", bound=InProcess)


@contextlib.asynccontextmanager
async def serving(database_url: str, rig: type[Rig]) -> AsyncIterator[Rig]:
    """The app in process on `database_url`, a key of each scope, behind a `Network`; the
    clients it made are closed at the end."""
    app = create_app(make_settings(database_url))
    async with app.router.lifespan_context(app):
        keys: dict[str, str] = {}
        async with app.state.billing.engine.begin() as conn:
            for scope in auth.SCOPES:
                _key_id, keys[scope] = await auth.create_key(
                    conn, f"client-{scope}", frozenset({scope})
                )
        served = rig(Network(httpx.ASGITransport(app=app)), keys)
        yield served
        for client in served.clients:
            await client.aclose()


def new_server(database_url: str, logs: Path) -> Server:
    """A migrated database with a write key, and a port nothing listens on yet."""
    env = service_env(database_url)
    return Server(env, create_key(env, "write"), free_port(), logs)
