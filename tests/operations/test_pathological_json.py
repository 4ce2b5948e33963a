"""Finding 3 (issue 12): deep JSON was a plain-text 500, before authentication.

Every route of the app (from its OpenAPI document) gets pathological JSON bodies, without a key
and with a valid one. A route that needs a key answers 401 without reading the body at all
(the request's `receive` is never called); any body gets a 4xx JSON error in the one shape
(`{"error": ..., "detail": ...}`), never a 500 and never plain text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI

from ciris_billing import auth
from ciris_billing.app import create_app
from tests.support.api import UNUSED_DATABASE_URL, make_settings
from tests.support.operations import OPERATIONS

LIMIT = make_settings(UNUSED_DATABASE_URL).max_request_bytes
VALID = b'"oauth_provider":"oauth:google","external_id":"fuzz@example.com"'
BODIES: dict[str, bytes] = {
    "arrays nested 1,000 deep": b"[" * 1000 + b"]" * 1000,
    "arrays nested 100,000 deep": b"[" * 100_000 + b"]" * 100_000,
    "objects nested 1,000 deep": b'{"a":' * 1000 + b"1" + b"}" * 1000,
    "objects nested 100,000 deep": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "deep metadata in a valid body": b"{"
    + VALID
    + b',"metadata":'
    + b'{"a":' * 1000
    + b"1"
    + b"}" * 1000
    + b"}",
    "deep list in a valid body": b"{" + VALID + b',"uses":' + b"[" * 1000 + b"]" * 1000 + b"}",
    "huge exponent": b"{" + VALID + b',"uses":1e999999,"amount_minor":1e999999}',
    "huge integer": b"{" + VALID + b',"uses":1' + b"0" * 5000 + b"}",
    "huge integer alone": b"1" + b"0" * 5000,
    "duplicate keys": b'{"oauth_provider":"oauth:google","oauth_provider":"oauth:github",'
    b'"external_id":"dup@example.com","external_id":"dup2@example.com"}',
    "invalid UTF-8": b'{"oauth_provider":"oauth:google","external_id":"\xff\xfe\xfd"}',
    "huge array": b"[" + b"0," * 100_000 + b"0]",
    "NaN": b"{" + VALID + b',"uses":NaN,"amount_minor":NaN}',
    "Infinity": b"{" + VALID + b',"uses":Infinity,"amount_minor":-Infinity}',
    "bare NaN": b"NaN",
}


@dataclass
class Answer:
    status: int
    content_type: str
    body: bytes
    body_read: bool

    def json(self) -> Any:
        return json.loads(self.body)


async def call(app: FastAPI, method: str, path: str, body: bytes, key: str | None) -> Answer:
    """One request straight through the app's ASGI entry, noting whether it read the body."""
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if key is not None:
        headers.append((b"x-api-key", key.encode()))
    path_part, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path_part,
        "raw_path": path_part.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    read = False
    sent = False
    status = 0
    content_type = ""
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal read, sent
        read = True
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status, content_type
        if message["type"] == "http.response.start":
            status = message["status"]
            for name, value in message["headers"]:
                if name.lower() == b"content-type":
                    content_type = value.decode()
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return Answer(status, content_type, b"".join(chunks), read)


@pytest.fixture
async def served(database_url: str) -> AsyncIterator[tuple[FastAPI, str]]:
    settings = make_settings(
        database_url, rate_limit_account_per_minute=60_000, rate_limit_key_per_second=100_000
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with app.state.billing.engine.begin() as conn:
            _key_id, key = await auth.create_key(conn, "fuzz-admin", frozenset({"admin"}))
        yield app, key


def assert_error_shape(answer: Answer, where: str) -> None:
    assert 400 <= answer.status < 500, f"{where}: {answer.status} {answer.body[:300]!r}"
    assert answer.content_type.startswith("application/json"), f"{where}: {answer.content_type}"
    error = answer.json()
    assert isinstance(error.get("error"), str), where
    assert isinstance(error.get("detail"), str), where


async def test_finding_3_deep_json_is_a_4xx_json_after_authentication(
    served: tuple[FastAPI, str],
) -> None:
    app, key = served
    assert any(op.template == "/v1/billing/charges" for op in OPERATIONS)
    for operation in OPERATIONS:
        for name, body in BODIES.items():
            where = f"{operation.method} {operation.template} ({name})"
            if operation.needs_key:
                anonymous = await call(app, operation.method, operation.path, body, None)
                # Over MAX_REQUEST_BYTES by its Content-Length: 413, also unread.
                expected = 413 if len(body) > LIMIT else 401
                assert anonymous.status == expected, f"{where}, no key: {anonymous.body[:300]!r}"
                assert not anonymous.body_read, f"{where}: the body was read before the key"
                assert_error_shape(anonymous, f"{where}, no key")
                wrong = await call(app, operation.method, operation.path, body, "cbk_not_a_key")
                assert wrong.status == expected, where
                assert not wrong.body_read, where
            answer = await call(app, operation.method, operation.path, body, key)
            assert answer.status < 500, f"{where}: {answer.status} {answer.body[:300]!r}"
            json_error = answer.status >= 400 and answer.content_type.startswith("application/json")
            if operation.takes_json or json_error:
                assert_error_shape(answer, where)


async def test_finding_3_one_authentication_per_request(
    served: tuple[FastAPI, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge authenticates; the fast path and the routes' key dependency use its principal."""
    app, key = served
    keys = app.state.billing.keys
    calls: list[str] = []
    authenticate = keys.authenticate

    async def counted(presented: str | None, scope: str) -> auth.Principal:
        calls.append(scope)
        principal: auth.Principal = await authenticate(presented, scope)
        return principal

    monkeypatch.setattr(keys, "authenticate", counted)
    user = b'{"oauth_provider":"oauth:google","external_id":"once@example.com"}'
    requests = [
        ("POST", "/v1/billing/credits/check", user, 200),
        ("POST", "/v1/billing/charges", user, 201),
        ("POST", "/v1/billing/charges", b'{"uses":"x"}', 422),  # handed on to the framework
        ("GET", "/v1/billing/accounts/oauth:google/once@example.com", b"", 200),
        ("POST", "/v1/billing/accounts", b'{"oauth_provider":"oauth:google"}', 422),
    ]
    for method, path, body, status in requests:
        calls.clear()
        answer = await call(app, method, path, body, key)
        assert answer.status == status, (path, answer.body)
        assert len(calls) == 1, (method, path, calls)
