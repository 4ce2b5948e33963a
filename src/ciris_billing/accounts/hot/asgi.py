"""The fast path: credit checks, charges, holds and captures served without the framework's
layers.

Agents make these requests on every interaction. Profiled under load, FastAPI's routing,
dependency solving and per-request exception plumbing took more Python time than the check
itself, so this ASGI layer, in front of the framework (app.py BillingApp: request ids, the
latency metric and the body limit still wrap it), serves those routes itself. It changes
nothing about what they answer:

- the API key was authenticated by the edge (edge.RouteGate: its scope, before the body was
  read, as for every route); its principal is taken from the scope, so the request is
  authenticated once (without the edge, the same `authorize` as the routes' dependency runs).
  The key's rate limit is taken here, together with the account's, once the body names the
  account: with shared limits (REDIS_URL) that is one Redis round trip per request, not two;
  a request handed on to the framework has its key limit taken by the route's dependency;
- the body is parsed with the edge's strict parser (edge.loads_strict: a pathological body is
  a 422 here, as the edge answers for the framework's routes) and validated with the route's
  own pydantic model, exactly as FastAPI would (JSON content types only);
- the answer comes from accounts/answers.py (checks, charges) or accounts/reservation_answers.py
  (holds, captures), the functions the routes call too (status, body, headers, metrics, logs);
  a capture's reservation id is validated with the route's own path parameter type; errors are
  rendered by errors_http.py, as the app's handlers do
  (an error it does not answer reaches the server, which answers 500, as from the framework);
- the latency metric is labelled with the route template this layer names as its own.

It cannot skip what a route asks for: each lane declares the route dependencies it implements,
and `HotPath` refuses to start (HotPathMismatch) unless the framework's route for that path has
exactly those (added, removed or changed dependencies all count).

Anything it does not handle whole — another route or method, a non-JSON content type, a body
that is not valid for the model — goes on to FastAPI unchanged, with the body replayed, and is
answered exactly as before (the same 422s; the principal stays in the scope, so FastAPI does
not authenticate again).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, get_args

from fastapi import FastAPI, Request
from fastapi.dependencies.models import Dependant
from fastapi.responses import Response
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ciris_billing.accounts import answers, reservation_answers
from ciris_billing.accounts.reservation_routes import ReservationId
from ciris_billing.accounts.schemas import (
    ChargeCreate,
    CreditCheck,
    ReservationCapture,
    ReservationCreate,
)
from ciris_billing.auth import API_KEY_HEADER, BEARER, Principal
from ciris_billing.deps import (
    KEY_LIMIT_DUE,
    AppState,
    ReadKey,
    WriteKey,
    app_state,
    authenticated,
    authorize,
)
from ciris_billing.edge import (
    InvalidJSON,
    invalid_json,
    is_json,
    loads_strict,
    read_body,
    replaying,
)
from ciris_billing.errors import RateLimited
from ciris_billing.errors_http import error_response
from ciris_billing.observability import ROUTE_TEMPLATE

Serve = Callable[[Any, Request, AppState, Headers, Principal, str | None], Awaitable[Response]]

# The capture route's one path parameter, as the framework would validate it.
_RESERVATION_ID: TypeAdapter[str] = TypeAdapter(ReservationId)
_RESERVATIONS = reservation_answers.RESERVE_ROUTE + "/"
_CAPTURE = "/capture"


class HotPathMismatch(RuntimeError):
    """A hot route's dependencies differ from what the fast path implements for it."""


def _body(model: Any) -> str:
    return f"body {getattr(model, '__module__', '')}.{getattr(model, '__qualname__', model)}"


def _depends(call: Callable[..., Any]) -> str:
    scope = getattr(call, "required_scope", None)  # deps.require(scope): an API key's scope
    # A class instance (fastapi.security's APIKeyHeader, HTTPBearer) is named by its class.
    named = call if hasattr(call, "__qualname__") else type(call)
    name = f"depends {named.__module__}.{named.__qualname__}"
    return name if scope is None else f"{name} scope={scope}"


def _api_key(key: Any) -> str:
    """deps.ReadKey / WriteKey: the scope's dependency, and the app state it reads."""
    return _depends(get_args(key)[1].dependency)


def _header(alias: str) -> str:
    return f"header {alias}"


async def _check(
    body: Any,
    request: Request,
    state: AppState,
    _headers: Headers,
    _principal: Principal,
    key_limit_due: str | None,
) -> Response:
    return await answers.check(
        state, request, body, key_limit_due, may_write=_principal.allows("write")
    )


async def _charge(
    body: Any,
    request: Request,
    state: AppState,
    headers: Headers,
    principal: Principal,
    key_limit_due: str | None,
) -> Response:
    idempotency_key = headers.get("idempotency-key")
    return await answers.charge(state, request, body, idempotency_key, principal, key_limit_due)


async def _reserve(
    body: Any,
    request: Request,
    state: AppState,
    headers: Headers,
    principal: Principal,
    key_limit_due: str | None,
) -> Response:
    key = headers.get("idempotency-key")
    return await reservation_answers.reserve(state, request, body, key, principal, key_limit_due)


async def _capture(
    body: Any,
    request: Request,
    state: AppState,
    headers: Headers,
    principal: Principal,
    key_limit_due: str | None,
) -> Response:
    reservation_id: str = request.path_params["reservation_id"]
    key = headers.get("idempotency-key")
    return await reservation_answers.capture(
        state, request, reservation_id, body, key, principal, key_limit_due
    )


@dataclass(frozen=True, slots=True)
class _Lane:
    path: str  # the route template: the latency metric's label, as for the framework's routes
    model: type[BaseModel]
    scope: str  # the API key scope the route needs
    serve: Serve
    # Everything the framework's route depends on, as `requirements` describes it, and that
    # `serve` does itself; anything else on the route refuses start-up.
    implements: frozenset[str]


_STATE = _depends(app_state)  # the app's state: self.billing.state.billing, as app_state reads it
# The key's two OpenAPI security schemes: authorize() reads both headers itself (chosen_key);
# they ask the framework for the connection only to read those headers.
_KEY_SCHEMES = frozenset({_depends(API_KEY_HEADER), _depends(BEARER), "http_connection_param_name"})
_KEYED_WRITE = frozenset({_STATE, _api_key(WriteKey), _header("Idempotency-Key"), *_KEY_SCHEMES})
_LANES: dict[str, _Lane] = {
    lane.path: lane
    for lane in (
        _Lane(
            answers.CHECK_ROUTE,
            CreditCheck,
            "read",
            _check,
            frozenset({_body(CreditCheck), _STATE, _api_key(ReadKey), *_KEY_SCHEMES}),
        ),
        _Lane(
            answers.CHARGE_ROUTE,
            ChargeCreate,
            "write",
            _charge,
            frozenset(
                {
                    _body(ChargeCreate),
                    _STATE,
                    _api_key(WriteKey),
                    _header("Idempotency-Key"),
                    *_KEY_SCHEMES,
                }
            ),
        ),
        _Lane(
            reservation_answers.RESERVE_ROUTE,
            ReservationCreate,
            "write",
            _reserve,
            frozenset({_body(ReservationCreate), *_KEYED_WRITE}),
        ),
        _Lane(
            reservation_answers.CAPTURE_ROUTE,
            ReservationCapture,
            "write",
            _capture,
            # The body is optional on the route: an empty one goes on to the framework.
            frozenset({_body(ReservationCapture | None), "path reservation_id", *_KEYED_WRITE}),
        ),
    )
}


def _lane_of(path: str) -> tuple[_Lane | None, dict[str, str]]:
    """The lane serving `path`, with its path parameters (valid as the route's, else no lane:
    the framework answers)."""
    lane = _LANES.get(path)
    if lane is not None:
        return lane, {}
    if path.startswith(_RESERVATIONS) and path.endswith(_CAPTURE):
        reservation_id = path[len(_RESERVATIONS) : -len(_CAPTURE)]
        if "/" not in reservation_id:
            try:
                valid = _RESERVATION_ID.validate_python(reservation_id)
            except ValidationError:
                return None, {}
            return _LANES[reservation_answers.CAPTURE_ROUTE], {"reservation_id": valid}
    return None, {}


def requirements(dependant: Dependant) -> frozenset[str]:
    """What a route (or dependency) needs the framework to do for it, sub-dependencies
    included: its dependencies, parameters from the path, query, headers, cookies and body,
    and the framework objects it asks for (the request itself is just the request)."""
    found: set[str] = set()
    for field in dependant.body_params:
        found.add(_body(field.field_info.annotation))
    for kind, fields in (
        ("path", dependant.path_params),
        ("query", dependant.query_params),
        ("header", dependant.header_params),
        ("cookie", dependant.cookie_params),
    ):
        found.update(f"{kind} {field.alias}" for field in fields)
    for special in (
        "websocket_param_name",
        "http_connection_param_name",
        "response_param_name",
        "background_tasks_param_name",
        "security_scopes_param_name",
    ):
        if getattr(dependant, special) is not None:
            found.add(special)
    for sub in dependant.dependencies:
        if sub.call is not None:
            found.add(_depends(sub.call))
        found |= requirements(sub)
    return frozenset(found)


def check_lanes(app: FastAPI) -> None:
    """Refuse (HotPathMismatch) unless each lane's POST route exists in `app` and depends on
    exactly what the lane implements."""
    for lane in _LANES.values():
        # The routes as the framework serves them (included routers' dependencies applied).
        routes = [
            route
            for route in iter_route_contexts(app.router.routes)
            if route.path == lane.path
            and "POST" in (route.methods or ())
            and isinstance(route.original_route, APIRoute)
        ]
        if len(routes) != 1:
            raise HotPathMismatch(f"POST {lane.path}: {len(routes)} framework routes, not 1")
        needed = requirements(routes[0].dependant)
        if needed != lane.implements:
            raise HotPathMismatch(
                f"POST {lane.path}: the route needs {sorted(needed - lane.implements)} that the "
                f"fast path does not do, and the fast path does {sorted(lane.implements - needed)} "
                "that the route does not need"
            )


class HotPath:
    """Serves POST credit checks, charges, holds and captures itself; hands everything else
    to `app`, the
    framework's entry point of `billing` (whose state it uses). Refuses to be built when a hot
    route's dependencies differ from what its lane implements (check_lanes)."""

    def __init__(self, app: ASGIApp, billing: FastAPI) -> None:
        check_lanes(billing)
        self.app = app
        self.billing = billing
        # The routes whose JSON bodies this layer parses strictly itself (the edge does not).
        self.parses_strictly = frozenset(_LANES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane, path_params = _lane_of(scope["path"]) if scope["type"] == "http" else (None, {})
        if lane is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not is_json(headers.get("content-type")):
            await self.app(scope, receive, send)
            return
        state: AppState = self.billing.state.billing
        parsed: BaseModel | None = None
        principal: Principal | None = None
        try:
            # Before the body is read: the edge's principal, or (no edge) the key itself. The
            # key's rate limit is taken with the account's, once the body says which account
            # (deps.KEY_LIMIT_DUE: one round trip to a shared store instead of two).
            principal = authenticated(scope, lane.scope)
            if principal is None:
                principal = await authorize(state, headers, lane.scope, limit=False)
                scope[KEY_LIMIT_DUE] = True
            received: list[Message] = []
            body = await read_body(receive, received)
            # An empty body: the framework's own 422 ("field required"), as the edge leaves it.
            parsed = _validate(lane.model, body) if body else None
            if parsed is not None:
                scope[ROUTE_TEMPLATE] = lane.path
                scope["path_params"] = path_params
                request = Request(scope, receive)
                due = principal.key_id if scope.pop(KEY_LIMIT_DUE, False) else None
                response = await lane.serve(parsed, request, state, headers, principal, due)
        except Exception as exc:
            error = exc
            if principal is not None and scope.pop(KEY_LIMIT_DUE, False):
                # Refused before it was served (a body that is not JSON): it still counts
                # against the key's limit, and a key over its limit hears that first.
                try:
                    await state.key_limits.check(principal.key_id, "API key")
                except RateLimited as limited:
                    error = limited
            rendered = error_response(error)
            if rendered is None:
                raise
            response = rendered
        else:
            if parsed is None:
                await self.app(scope, replaying(received, receive), send)
                return
        await response(scope, receive, send)


def _validate(model: type[BaseModel], body: bytes) -> BaseModel | None:
    """The body as `model`, or None for the framework to answer its own 422. A body that is
    not strict JSON raises (a 422 from here: the framework's parser would take some of it)."""
    try:
        return model.model_validate(loads_strict(body))
    except InvalidJSON as exc:
        raise invalid_json(exc) from None
    except (ValueError, ValidationError):
        return None
