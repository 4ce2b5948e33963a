"""What routes share: the app's state, API-key scopes, the unit of work and idempotent replay."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, Header, Request, Security
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing import idempotency
from ciris_billing.accounts.hot.holds import CaptureStore, HoldStore
from ciris_billing.accounts.hot.reader import AccountReader
from ciris_billing.accounts.hot.writer import ChargeStore
from ciris_billing.auth import (
    API_KEY_HEADER,
    BEARER,
    KeyStore,
    Principal,
    chosen_key,
    presented_key,
)
from ciris_billing.config import Settings, host_name
from ciris_billing.installation import InstallationSecrets
from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.pricing import Pricing
from ciris_billing.ratelimit import FailureLimit, Limiter, check_all
from ciris_billing.rates.book import RateBook
from ciris_billing.unit_of_work import UnitOfWork, unit_of_work


@dataclass(slots=True)
class AppState:
    settings: Settings
    engine: AsyncEngine
    account_reader: AccountReader  # the one credit reader (hot path)
    charge_store: ChargeStore  # the one charge store (hot path)
    hold_store: HoldStore  # holds without an idempotency key (hot path)
    capture_store: CaptureStore  # captures without an idempotency key (hot path)
    pricing: Pricing
    keys: KeyStore
    provider: PaymentProvider
    link_secret: bytes
    key_limits: Limiter
    account_limits: Limiter
    secrets: InstallationSecrets
    console_logins: FailureLimit  # failed console logins, per client address
    rate_book: RateBook  # each feature's rate, refreshed every RATES_REFRESH_SECONDS

    def public_base_url(self, request: Request) -> str:
        """Where links sent to buyers point: PUBLIC_BASE_URL; else the request's own base URL
        when its Host is in ALLOWED_HOSTS; else `http://localhost:<our port>/`, a safe base
        (the Host header is the client's word: a link built from any Host would send the buyer,
        and a purchase's client secret, wherever the client said)."""
        if self.settings.public_base_url:
            return self.settings.public_base_url
        host = request.headers.get("host")
        if _host_allowed(host, self.settings.allowed_hosts):
            return _base_url(request, host)
        server = request.scope.get("server")
        port = f":{server[1]}" if server and server[1] not in (None, 80) else ""
        return f"http://localhost{port}/"


def _base_url(request: Request, host: str | None) -> str:
    """`str(request.base_url)`, cached by what it is made of when a Host header names it
    (Starlette builds it anew each time: ~10 us, and every credit check asks for it)."""
    scope = request.scope
    key = (scope.get("scheme", "http"), host, scope.get("root_path", ""))
    found = _BASE_URLS.get(key)
    if found is None:
        found = str(request.base_url)
        if len(_BASE_URLS) > 1024:
            _BASE_URLS.clear()
        _BASE_URLS[key] = found
    return found


_BASE_URLS: dict[tuple[str, str | None, str], str] = {}


def _host_allowed(host: str | None, allowed: list[str]) -> bool:
    """Is the Host header (a name, an optional port) one of ALLOWED_HOSTS?"""
    # Cached: every credit check builds a portal link from it (3.4 us parsed, 0.3 us cached).
    return host is not None and _host_in(host, tuple(allowed))


@lru_cache(maxsize=1024)
def _host_in(host: str, allowed: tuple[str, ...]) -> bool:
    if not host or not host.isascii() or not host.isprintable():
        return False
    try:
        parts = urlsplit(f"//{host}")
        _ = parts.port  # a port that is not a number: ValueError
    except ValueError:
        return False
    if parts.username is not None or parts.path or parts.query or parts.fragment:
        return False
    return parts.hostname is not None and host_name(parts.hostname) in allowed


async def app_state(request: Request) -> AppState:
    # async: FastAPI runs a plain `def` dependency in a worker thread on every request.
    state: AppState = request.app.state.billing
    return state


StateDep = Annotated[AppState, Depends(app_state)]


async def request_unit_of_work(state: StateDep) -> AsyncIterator[UnitOfWork]:
    async with unit_of_work(state.engine) as work:
        yield work


# scope="function": the commit runs when the route returns, before the response is sent.
UnitOfWorkDep = Annotated[UnitOfWork, Depends(request_unit_of_work, scope="function")]


# The scope key under which the edge (edge.RouteGate) leaves `(scope, principal)` once it has
# authenticated a request's key, before its body was read: the routes' key dependency and the
# fast path take the principal from there instead of authenticating a second time.
AUTHENTICATED = "ciris_billing.authenticated"


def authenticated(scope: Any, required: str) -> Principal | None:
    """The principal the edge authenticated for this request with `required` scope, if any."""
    found = scope.get(AUTHENTICATED)
    if found is not None and found[0] == required:
        principal: Principal = found[1]
        return principal
    return None


# The scope key the edge sets when it authenticated a request for a hot route (credit check,
# charge) without taking the API key's rate limit: the fast path takes it together with the
# account's (one Redis round trip); if the request goes on to the framework instead, the
# route's key dependency takes it. Whoever takes it pops it: once per request.
KEY_LIMIT_DUE = "ciris_billing.key_limit_due"


async def authorize(state: AppState, headers: Any, scope: str, *, limit: bool = True) -> Principal:
    """The request's API key, which must hold `scope`; then (unless `limit` is False: the
    caller takes it later) the key's rate limit."""
    return await authorize_key(state, presented_key(headers), scope, limit=limit)


async def authorize_key(
    state: AppState, key: str | None, scope: str, *, limit: bool = True
) -> Principal:
    principal = await state.keys.authenticate(key, scope)
    if limit:
        await state.key_limits.check(principal.key_id, "API key")
    return principal


async def take_limits(
    state: AppState, oauth_provider: str, external_id: str, key_limit_due: str | None
) -> None:
    """The account's rate limit, and the API key's (`key_limit_due`: its id) when the edge left
    it to be taken here (KEY_LIMIT_DUE): both in one round trip to a shared store."""
    account = f"{oauth_provider}/{external_id}"
    if key_limit_due is None:
        await state.account_limits.check(account, "account")
    else:
        await check_all(
            [
                (state.key_limits, key_limit_due, "API key"),
                (state.account_limits, account, "account"),
            ]
        )


def require(scope: str) -> Any:
    # The keys come through FastAPI's security dependencies so the OpenAPI document declares
    # both schemes on the operation; they never raise (auto_error=False), authorize_key does.
    # The edge has normally authenticated the key already (before the body was read): its
    # principal is used, so a request is authenticated (and rate-limited) once.
    async def dependency(
        request: Request,
        state: StateDep,
        api_key: Annotated[str | None, Security(API_KEY_HEADER)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
    ) -> Principal:
        principal = authenticated(request.scope, scope)
        if principal is not None:
            if request.scope.pop(KEY_LIMIT_DUE, False):
                await state.key_limits.check(principal.key_id, "API key")
            return principal
        return await authorize_key(state, chosen_key(api_key, bearer), scope)

    dependency.required_scope = scope  # type: ignore[attr-defined]  # read by the security tests
    return Depends(dependency)


ReadKey = Annotated[Principal, require("read")]
WriteKey = Annotated[Principal, require("write")]
AdminKey = Annotated[Principal, require("admin")]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Retry-safe key: the same key and request replay the first response",
    ),
]


# json.dumps with any option builds a new encoder per call; this one is built once.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def json_response(status_code: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=_ENCODE(body),
        status_code=status_code,
        media_type="application/json",
        headers=headers,
    )


Work = Callable[[AsyncConnection], Awaitable[tuple[int, Any]]]


async def replay_if_known(
    request: Request, work: UnitOfWork, principal: Principal, key: str | None, payload: Any
) -> Response | None:
    """Before an effect outside our database (a provider call): the stored response for this
    API key's `key`, a 409 for a different request under it, or None to go ahead."""
    if key is None:
        return None
    request_fingerprint = idempotency.fingerprint(request.method, request.url.path, payload)
    conn = await work.connection()
    stored = await idempotency.lookup(conn, principal.key_id, key, request_fingerprint)
    return None if stored is None else _replayed(stored)


def _replayed(stored: idempotency.StoredResponse) -> Response:
    return Response(
        content=stored.body,
        status_code=stored.status_code,
        media_type="application/json",
        headers={"Idempotent-Replayed": "true"},
    )


async def run_idempotent(
    request: Request,
    work: UnitOfWork,
    principal: Principal,
    key: str | None,
    payload: Any,
    effect: Work,
    kept: Callable[[Any], Any] | None = None,
) -> Response:
    """Run `effect` in the request's unit of work; with a key (scoped to `principal`, the
    authenticated API key), record its response in the same transaction or replay the stored
    one (the unit of work commits before the answer is sent). `kept`: what of the body is
    stored for a replay, when not all of it (a secret shown once is never stored)."""
    conn = await work.connection()
    if key is not None:
        request_fingerprint = idempotency.fingerprint(request.method, request.url.path, payload)
        stored = await idempotency.claim(conn, principal.key_id, key, request_fingerprint)
        if stored is not None:
            return _replayed(stored)
    status_code, body = await effect(conn)
    text = json.dumps(body, separators=(",", ":"))
    if key is not None:
        kept_text = text if kept is None else json.dumps(kept(body), separators=(",", ":"))
        await idempotency.record(conn, principal.key_id, key, status_code, kept_text)
    return Response(content=text, status_code=status_code, media_type="application/json")
