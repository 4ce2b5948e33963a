"""The hot path: credit checks and charges dispatched without the framework's layers.

Agents make these two requests on every interaction. Profiled under load, FastAPI's routing,
dependency solving and per-request exception plumbing took more Python time than the check
itself, so this ASGI layer, in front of the framework (app.py BillingApp: request ids, the
latency metric and the body limit still wrap it), serves the two routes directly. It changes
nothing about what they do:

- the body is validated with the route's own pydantic model, exactly as FastAPI would (JSON
  content types only, parsed with `json.loads`);
- the API key goes through the same `authorize` as the routes' dependency (scope, rate limit);
- the route's own endpoint function runs, with its own rate limits, metrics, logs and rendering;
- errors are rendered by the app's own exception handlers (an error none handles reaches the
  server, which answers 500, as it would from inside the framework).

Anything it does not handle whole — another route or method, a non-JSON content type, a body
that is not valid for the model — goes on to FastAPI unchanged, with the body replayed, and is
answered exactly as before (the same 422s). Validation runs before authentication because it
has no side effect: a request handed on is authenticated (and rate-limited) once, by FastAPI.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ciris_billing.accounts import routes
from ciris_billing.accounts.schemas import ChargeCreate, CreditCheck
from ciris_billing.deps import AppState, authorize

Endpoint = Callable[[Any, Request, AppState, Headers], Awaitable[Response]]


async def _check(body: Any, _request: Request, state: AppState, headers: Headers) -> Response:
    principal = await authorize(state, headers, "read")
    return await routes.check_credit(body, state, principal)


async def _charge(body: Any, request: Request, state: AppState, headers: Headers) -> Response:
    principal = await authorize(state, headers, "write")
    return await routes.create_charge(
        body, request, state, principal, headers.get("idempotency-key")
    )


@dataclass(frozen=True, slots=True)
class _Route:
    path: str  # what the latency metric reads from scope["route"], as from FastAPI's routes
    model: type[BaseModel]
    endpoint: Endpoint


_ROUTES: dict[str, _Route] = {
    route.path: route
    for route in (
        _Route("/v1/billing/credits/check", CreditCheck, _check),
        _Route("/v1/billing/charges", ChargeCreate, _charge),
    )
}


class HotPath:
    """Serves POST credit checks and charges directly; hands everything else to `app`, the
    framework's entry point of `billing` (whose state and exception handlers it uses)."""

    def __init__(self, app: ASGIApp, billing: FastAPI) -> None:
        self.app = app
        self.billing = billing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _ROUTES.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not _is_json(headers.get("content-type")):
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        body = await _read_body(receive, received)
        parsed = None if body is None else _validate(route.model, body)
        if parsed is None:
            await self.app(scope, _replaying(received, receive), send)
            return
        scope["route"] = route
        request = Request(scope, receive)
        try:
            response = await route.endpoint(parsed, request, self.billing.state.billing, headers)
        except Exception as exc:
            response = await _handled(self.billing, request, exc)
        await response(scope, receive, send)


def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule: application/json or application/*+json (parameters allowed)."""
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


async def _read_body(receive: Receive, received: list[Message]) -> bytes | None:
    """The whole body, or None if the client went away first (`received` keeps every message,
    so the request can be handed on as it came)."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _validate(model: type[BaseModel], body: bytes) -> BaseModel | None:
    try:
        return model.model_validate(json.loads(body))
    except (ValueError, ValidationError):  # JSONDecodeError and UnicodeDecodeError included
        return None


def _replaying(received: list[Message], receive: Receive) -> Receive:
    pending = list(received)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


async def _handled(app: FastAPI, request: Request, exc: Exception) -> Response:
    """The app's own exception handler for `exc` (as FastAPI would pick it), or re-raise."""
    for cls in type(exc).__mro__:
        handler = app.exception_handlers.get(cls)
        if handler is not None:
            response = handler(request, exc)
            return await response if inspect.isawaitable(response) else response
    raise exc
