"""The edge: what every request meets before any route reads its body.

`RouteGate` is a plain ASGI layer in front of the fast path and the framework. It matches the
request to its route template once, then:

- names the template in the scope (the latency metric and the access log use it, never the raw
  path, which may hold an email);
- for a route that needs an API key, authenticates the key (scope and rate limit) BEFORE the
  body is read or parsed: without a valid key the answer is 401/403 and the body stays unread.
  For the fast path's routes (credit check, charge) the key's rate limit is left to the fast
  path, which takes it with the account's in one go (deps.KEY_LIMIT_DUE);
  A key that is not valid counts as a failed console sign-in of the client (its address).
  The principal goes into the scope, and the routes' key dependency (deps.require) and the fast
  path take it from there: one authentication per request;
- for a framework route with a JSON body, parses the body strictly (`loads_strict`) and answers
  422 in the one error shape for anything pathological, so no parser below it ever sees deep
  nesting, NaN, non-finite or huge numbers, duplicate keys or invalid UTF-8. The fast path's
  routes are parsed strictly by the fast path itself (one parse).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ciris_billing.auth import presented_key
from ciris_billing.deps import AUTHENTICATED, KEY_LIMIT_DUE, authorize
from ciris_billing.errors import AuthenticationRequired, InvalidRequest
from ciris_billing.errors_http import error_response
from ciris_billing.observability import ROUTE_TEMPLATE


class InvalidJSON(ValueError):
    """The body is not JSON this service accepts (the reason is safe to show: no input)."""


class UnstorableText(InvalidJSON):
    """The body's text holds what PostgreSQL cannot store (NUL, a lone surrogate)."""


def _no_constant(name: str) -> Any:
    raise InvalidJSON(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise InvalidJSON("a number is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        raise InvalidJSON("an object has duplicate keys")
    return found


# json.loads with hooks builds a new decoder (and its scanner) per call; this one is built once.
_STRICT = json.JSONDecoder(
    parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique_keys
)


def loads_strict(body: bytes) -> Any:
    """JSON as RFC 8259 has it, and nothing two parsers could read differently: UTF-8 only, no
    NaN/Infinity, no number that does not fit a double (or an int over Python's 4,300 digits),
    no duplicate keys, no lone surrogate escapes, nesting only as deep as the parser's stack
    allows. Raises InvalidJSON (a ValueError) with a reason that echoes no input."""
    try:
        text = body.decode("utf-8")
        if text.startswith("\ufeff"):  # as json.loads refuses it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        parsed = _STRICT.decode(text)
        if "\\u" in text:
            # Only an escape can put these in a string (raw control characters are not JSON):
            # "\u0000" decodes to NUL, which PostgreSQL text and jsonb cannot hold, and
            # "\ud800" to a lone surrogate, which no database driver encodes.
            _refuse_unstorable(parsed)
    except RecursionError:
        raise InvalidJSON("it is nested too deeply") from None
    except InvalidJSON:
        raise
    except UnicodeError:
        raise InvalidJSON("it is not UTF-8 text") from None
    except ValueError as exc:  # JSONDecodeError, or an integer over the digit limit
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "a number is too long"
        raise InvalidJSON(reason) from None
    return parsed


def _refuse_unstorable(value: Any) -> None:
    """InvalidJSON if any string in `value` (object keys included) holds a NUL character or a
    lone surrogate: text PostgreSQL cannot store is refused here, on every route and field,
    instead of failing the statement that stores it (a 500, and a batch with it)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, str):
            if "\x00" in item:
                raise UnstorableText("a string holds a NUL character (\\u0000)")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise UnstorableText("a string holds a lone surrogate (\\ud800-\\udfff)") from None


def unstorable_in_url(scope: Scope) -> bool:
    """Whether the path or query string holds a NUL character (%00), which no column can
    store (a lone surrogate cannot arrive there: percent-decoding replaces invalid UTF-8)."""
    return "\x00" in scope["path"] or b"%00" in scope.get("query_string", b"")


def invalid_json(exc: InvalidJSON) -> InvalidRequest:
    if isinstance(exc, UnstorableText):
        return InvalidRequest(f"The request body holds text that cannot be stored: {exc}")
    return InvalidRequest(f"The request body is not valid JSON: {exc}")


def unstorable_request() -> InvalidRequest:
    return InvalidRequest(
        "The request holds a NUL character (%00), which cannot be stored", field="url"
    )


def is_json(content_type: str | None) -> bool:
    """FastAPI's rule for parsing a body as JSON: application/json or application/*+json
    (parameters allowed); no content type: not parsed (strict_content_type)."""
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


@dataclass(frozen=True, slots=True)
class RouteRule:
    template: str
    scope: str | None  # the API key scope it needs; None: public by design
    takes_json: bool  # the framework parses its body as JSON


def _required_scope(dependant: Dependant) -> str | None:
    for sub in dependant.dependencies:
        scope = getattr(sub.call, "required_scope", None)
        if scope is not None:
            return str(scope)
        found = _required_scope(sub)
        if found is not None:
            return found
    return None


class _Routes:
    """Method and path -> the route's rule, as the framework's router would match it: routes
    in order, the first whose path and method both match."""

    def __init__(self, app: FastAPI) -> None:
        ordered: list[tuple[re.Pattern[str], frozenset[str], RouteRule]] = []
        for route in iter_route_contexts(app.router.routes):
            if not isinstance(route.original_route, APIRoute) or route.path is None:
                continue
            dependant = route.dependant
            rule = RouteRule(route.path, _required_scope(dependant), bool(dependant.body_params))
            ordered.append((route.path_regex, frozenset(route.methods or ()), rule))
        self._ordered = ordered
        # Paths without parameters, by method and path: one dict look-up (the hot routes).
        self._exact: dict[tuple[str, str], RouteRule] = {}
        for _regex, methods, rule in ordered:
            if "{" in rule.template:
                continue
            for method in methods:
                if self._scan(method, rule.template) is rule:
                    self._exact[(method, rule.template)] = rule

    def _scan(self, method: str, path: str) -> RouteRule | None:
        for regex, methods, rule in self._ordered:
            if method in methods and regex.match(path):
                return rule
        return None

    def match(self, method: str, path: str) -> RouteRule | None:
        rule = self._exact.get((method, path))
        return rule if rule is not None else self._scan(method, path)

    def __iter__(self) -> Iterable[RouteRule]:
        return iter(rule for _r, _m, rule in self._ordered)


class RouteGate:
    """Route template, authentication before the body, strict JSON (see the module's doc).
    `parsed_elsewhere`: templates whose bodies a layer below parses strictly itself."""

    def __init__(self, app: ASGIApp, billing: FastAPI, parsed_elsewhere: frozenset[str]) -> None:
        self.app = app
        self.billing = billing
        self.routes = _Routes(billing)
        self.parsed_elsewhere = parsed_elsewhere

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if unstorable_in_url(scope):  # before any route looks it up by what it names
            await _refuse(unstorable_request(), scope, receive, send)
            return
        rule = self.routes.match(scope["method"], scope["path"])
        if rule is None:  # not a route of ours: the framework answers (404, 405, docs)
            await self.app(scope, receive, send)
            return
        scope[ROUTE_TEMPLATE] = rule.template
        headers: Headers | None = None
        if rule.scope is not None:
            headers = Headers(scope=scope)
            try:
                # A hot route's key limit is taken with its account's (deps.KEY_LIMIT_DUE).
                hot = rule.template in self.parsed_elsewhere
                principal = await authorize(
                    self.billing.state.billing, headers, rule.scope, limit=not hot
                )
                if hot:
                    scope[KEY_LIMIT_DUE] = True
            except Exception as exc:
                rendered = error_response(exc)
                if rendered is None:
                    raise
                if isinstance(exc, AuthenticationRequired) and presented_key(headers):
                    # A wrong key counts as a failed console sign-in of this client: guessing
                    # the admin key through the API gets no more tries than the login form.
                    client = scope.get("client")
                    failures = self.billing.state.billing.console_logins
                    await failures.failed(client[0] if client else "unknown")
                await rendered(scope, receive, send)
                return
            scope[AUTHENTICATED] = (rule.scope, principal)
        if rule.takes_json and rule.template not in self.parsed_elsewhere:
            headers = headers or Headers(scope=scope)
            if is_json(headers.get("content-type")):
                received: list[Message] = []
                body = await read_body(receive, received)
                if body:  # an empty body: the framework's own 422 ("field required")
                    try:
                        loads_strict(body)
                    except InvalidJSON as exc:
                        answer = error_response(invalid_json(exc))
                        assert answer is not None
                        await answer(scope, receive, send)
                        return
                receive = replaying(received, receive)
        await self.app(scope, receive, send)


async def _refuse(error: InvalidRequest, scope: Scope, receive: Receive, send: Send) -> None:
    answer = error_response(error)
    assert answer is not None
    await answer(scope, receive, send)


async def read_body(receive: Receive, received: list[Message]) -> bytes | None:
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


def replaying(received: list[Message], receive: Receive) -> Receive:
    pending = list(received)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay
