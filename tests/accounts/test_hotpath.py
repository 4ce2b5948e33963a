"""The hot path (accounts/hot/asgi.py) answers credit checks and charges exactly as FastAPI's
routes do, and refuses to start when a hot route depends on something it does not implement.

Two apps share one database: the service as it runs, and the same app built with
`hot_path=False`. Every request below goes to both (each for its own user) and the two
answers must be the same: status, body (ids and times aside) and the headers that carry meaning.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, params
from fastapi.routing import APIRoute

from ciris_billing import auth
from ciris_billing.accounts.hot.asgi import HotPath, HotPathMismatch
from ciris_billing.accounts.reservation_routes import router as reservations_router
from ciris_billing.accounts.routes import router as accounts_router
from ciris_billing.app import create_app
from tests.support.api import make_settings

CHECK = "/v1/billing/credits/check"
CHARGES = "/v1/billing/charges"
RESERVE = "/v1/billing/reservations"
CAPTURE = "/v1/billing/reservations/{reservation_id}/capture"
VOLATILE = (
    "charge_id",
    "account_id",
    "created_at",
    "updated_at",
    "checkout_url",
    "portal_url",
    "reservation_id",
    "expires_at",
    "lot_id",  # a charge's lots: each account's own
)
MEANINGFUL_HEADERS = (
    "content-type",
    "idempotent-replayed",
    "retry-after",
    "allow",
    "www-authenticate",
)


@dataclass
class Twins:
    fast: httpx.AsyncClient  # with the hot path
    framework: httpx.AsyncClient  # without it
    keys: dict[str, str]

    async def both(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        user: str = "someone",
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        scope: str | None = "write",
    ) -> tuple[int, Any]:
        """Send the request to both apps, each for its own user; assert equal answers."""
        answers = []
        for side, client in (("fast", self.fast), ("framework", self.framework)):
            sent_headers = {"X-API-Key": self.keys[scope]} if scope else {}
            # Idempotency keys are global: each side gets its own ("SIDE" in a key).
            sent_headers.update({k: v.replace("SIDE", side) for k, v in (headers or {}).items()})
            payload = body
            if isinstance(body, dict) and "external_id" in body:
                payload = {**body, "external_id": f"{side}-{user}@example.com"}
                if "idempotency_key" in body:
                    payload["idempotency_key"] = body["idempotency_key"].replace("SIDE", side)
            raw = content.replace(b"USER", f"{side}-{user}".encode()) if content else None
            if raw is not None:
                response = await client.request(method, path, content=raw, headers=sent_headers)
            else:
                response = await client.request(method, path, json=payload, headers=sent_headers)
            answers.append(_comparable(response, side))
        assert answers[0] == answers[1]
        return answers[0][0], answers[0][1]


def _comparable(response: httpx.Response, side: str) -> tuple[int, Any, dict[str, str]]:
    text = response.text.replace(side, "SIDE")
    try:
        body = response.json() if text else None
        body = _masked(body, side)
    except ValueError:
        body = text
    headers = {
        name: response.headers[name] for name in MEANINGFUL_HEADERS if name in response.headers
    }
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    return response.status_code, body, headers


def _masked(value: Any, side: str) -> Any:
    if isinstance(value, dict):
        return {k: "..." if k in VOLATILE else _masked(v, side) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, side) for v in value]
    if isinstance(value, str):
        return value.replace(side, "SIDE")
    return value


@pytest.fixture
async def twins(database_url: str) -> AsyncIterator[Twins]:
    settings = make_settings(database_url, rate_limit_account_per_minute=60_000)
    fast_app, framework_app = create_app(settings), create_app(settings, hot_path=False)
    async with (
        fast_app.router.lifespan_context(fast_app),
        framework_app.router.lifespan_context(framework_app),
    ):
        keys = {}
        async with fast_app.state.billing.engine.begin() as conn:
            for scope in auth.SCOPES:
                keys[scope] = (await auth.create_key(conn, f"t-{scope}", frozenset({scope})))[1]
        keys["revoked"] = "cbk_" + "x" * 43
        async with (
            _client(fast_app) as fast,
            _client(framework_app) as framework,
        ):
            yield Twins(fast, framework, keys)


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://b.test")


def user(name: str) -> dict[str, Any]:
    return {"oauth_provider": "oauth:google", "external_id": name}


async def test_checks_and_charges_until_a_purchase_is_required(twins: Twins) -> None:
    body = {**user("u"), "amount_minor": 100, "currency": "USD", "description": "chat"}
    assert (await twins.both("POST", CHECK, {**user("u"), "context": {}}, scope="read"))[0] == 200
    statuses = [(await twins.both("POST", CHARGES, body))[0] for _ in range(4)]
    assert statuses == [201, 201, 201, 402]
    status, answer = await twins.both("POST", CHECK, user("u"), scope="read")
    assert (status, answer["purchase_required"]) == (200, True)


async def test_idempotent_replay_and_conflict(twins: Twins) -> None:
    body = {**user("i"), "metadata": {"turn": 1}}
    first = await twins.both("POST", CHARGES, body, headers={"Idempotency-Key": "SIDE-k1"})
    again = await twins.both("POST", CHARGES, body, headers={"Idempotency-Key": "SIDE-k1"})
    assert first[0] == again[0] == 201
    other = await twins.both(
        "POST", CHARGES, {**body, "uses": 2}, headers={"Idempotency-Key": "SIDE-k1"}
    )
    assert other[0] == 409
    in_body = await twins.both("POST", CHARGES, {**body, "idempotency_key": "SIDE-k2"})
    assert in_body[0] == 201


async def _holds(client: httpx.AsyncClient, key: str, side: str) -> list[Any]:
    """Holds and captures, the usual and the unusual, on one app; their answers."""
    who = user(f"{side}-holder@example.com")
    sent: list[httpx.Response] = []

    async def post(path: str, body: Any = None, **headers: str) -> Any:
        answer = await client.post(path, json=body, headers={"X-API-Key": key, **headers})
        sent.append(answer)
        return answer.json() if answer.content else None

    hold = await post(RESERVE, {**who, "uses": 2, "metadata": {"task": "a", "turn": 1}})
    capture = f"{RESERVE}/{hold['reservation_id']}/capture"
    await post(capture, {"uses": 1, "description": "chat", "metadata": {"turn": 2}})
    await post(capture, {})  # captured already: 409
    await post(f"{RESERVE}/rsv_nothing/capture", {})  # 404
    await post(f"{RESERVE}/{'x' * 41}/capture", {})  # the path parameter's 422
    second = await post(RESERVE, {**who, "uses": 2})  # the 2 uses left
    await post(RESERVE, {**who, "uses": 1})  # 402, with where to buy
    await post(f"{RESERVE}/{second['reservation_id']}/capture", {"uses": 3})  # 422: held 2
    empty = await client.post(  # an empty body: all the held uses
        f"{RESERVE}/{second['reservation_id']}/capture",
        headers={"X-API-Key": key, "Content-Type": "application/json"},
    )
    sent.append(empty)
    await post(RESERVE, {**user(f"{side}-new@example.com"), "uses": 3})  # created as a check
    keyed = {**user(f"{side}-keyed@example.com"), "uses": 1}
    replayed = await post(RESERVE, keyed, **{"Idempotency-Key": f"{side}-h1"})
    await post(RESERVE, keyed, **{"Idempotency-Key": f"{side}-h1"})  # replayed
    await post(RESERVE, {**keyed, "uses": 2}, **{"Idempotency-Key": f"{side}-h1"})  # 409
    keyed_capture = f"{RESERVE}/{replayed['reservation_id']}/capture"
    await post(keyed_capture, {}, **{"Idempotency-Key": f"{side}-c1"})
    await post(keyed_capture, {}, **{"Idempotency-Key": f"{side}-c1"})  # replayed
    return [_comparable(answer, side) for answer in sent]


async def test_holds_and_captures_answer_as_the_framework_does(twins: Twins) -> None:
    fast = await _holds(twins.fast, twins.keys["write"], "fast")
    framework = await _holds(twins.framework, twins.keys["write"], "framework")
    assert fast == framework
    assert [status for status, _, _ in fast] == [
        201, 201, 409, 404, 422, 201, 402, 422, 201, 201, 201, 201, 409, 201, 201,
    ]  # fmt: skip


VALID = b'{"oauth_provider": "oauth:google", "external_id": "USER"}'


@pytest.mark.parametrize(
    ("path", "content", "content_type", "expected"),
    [
        (CHARGES, b"{}", "application/json", 422),
        (CHARGES, b'{"oauth_provider": "google", "external_id": "USER"}', "application/json", 422),
        (
            CHARGES,
            b'{"oauth_provider": "oauth:google", "external_id": "USER", "uses": 0}',
            "application/json",
            422,
        ),
        (CHARGES, b"not json", "application/json", 422),
        (CHARGES, b"[1, 2]", "application/json", 422),
        (CHARGES, b"", "application/json", 422),
        (CHARGES, b"\xff\xfe", "application/json", 422),
        (CHARGES, VALID, "text/plain", 422),
        (CHARGES, VALID, "", 422),
        (CHARGES, VALID, "application/vnd.ciris+json; charset=utf-8", 201),
        (
            CHECK,
            b'{"oauth_provider": "oauth:google", "external_id": "a/b"}',
            "application/json",
            422,
        ),
        (CHECK, VALID, "APPLICATION/JSON", 200),
    ],
)
async def test_bodies_and_content_types(
    twins: Twins, path: str, content: bytes, content_type: str, expected: int
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    scope = "read" if path == CHECK else "write"
    status, _ = await twins.both("POST", path, content=content, headers=headers, scope=scope)
    assert status == expected


async def test_keys_scopes_and_methods(twins: Twins) -> None:
    valid = user("k")
    assert (await twins.both("POST", CHARGES, valid, scope=None))[0] == 401
    assert (await twins.both("POST", CHARGES, valid, scope="revoked"))[0] == 401
    assert (await twins.both("POST", CHARGES, valid, scope="read"))[0] == 403
    # A bad key is reported before a bad body, as the framework's dependency order has it.
    assert (await twins.both("POST", CHARGES, {"uses": "x"}, scope=None))[0] == 401
    assert (await twins.both("POST", CHECK, valid, scope="read"))[0] == 200
    assert (await twins.both("GET", CHARGES, scope="read"))[0] == 405


async def test_which_key_header_wins(twins: Twins) -> None:
    """The routes read keys through FastAPI's security schemes, the fast path from the headers
    (auth.presented_key): the same key wins on both."""
    read, write = twins.keys["read"], twins.keys["write"]
    cases = [
        ({"X-API-Key": read, "Authorization": f"Bearer {write}"}, 403),  # X-API-Key wins
        ({"X-API-Key": "", "Authorization": f"Bearer {write}"}, 201),  # an empty one does not
        ({"Authorization": f"bearer   {write}  "}, 201),
        ({"Authorization": f"Basic {write}"}, 401),
        ({"Authorization": "Bearer "}, 401),
        ({"Authorization": write}, 401),
    ]
    for headers, expected in cases:
        status, _ = await twins.both("POST", CHARGES, user("w"), headers=headers, scope=None)
        assert status == expected, headers


async def test_rate_limited_account_gets_429_with_retry_after(database_url: str) -> None:
    settings = make_settings(database_url, rate_limit_account_per_minute=6)  # a burst of 1
    app = create_app(settings)
    async with app.router.lifespan_context(app), _client(app) as http:
        async with app.state.billing.engine.begin() as conn:
            key = (await auth.create_key(conn, "t", frozenset({"write"})))[1]
        answers = [
            await http.post(CHARGES, json=user("busy"), headers={"X-API-Key": key})
            for _ in range(2)
        ]
    assert [a.status_code for a in answers] == [201, 429]
    assert answers[1].headers["retry-after"] == "10"
    assert answers[1].json()["error"] == "rate_limited"


async def test_latency_metric_is_labelled_with_the_route(twins: Twins) -> None:
    await twins.both("POST", CHARGES, user("m"))
    exposition = (await twins.fast.get("/metrics", headers={"X-API-Key": twins.keys["read"]})).text
    assert re.search(
        r'billing_http_request_duration_seconds_count\{method="POST",route="/v1/billing/charges",'
        r'status="201"\} [1-9]',
        exposition,
    )


def _framework_with(extra: dict[str, list[params.Depends]]) -> FastAPI:
    """A copy of the accounts and reservations routes, with extra dependencies on the routes
    named in `extra`."""
    copy = APIRouter()
    for route in [*accounts_router.routes, *reservations_router.routes]:
        assert isinstance(route, APIRoute)
        copy.add_api_route(
            route.path,
            route.endpoint,
            methods=sorted(route.methods or ()),
            dependencies=extra.get(route.path, []),
        )
    framework = FastAPI()
    framework.include_router(copy)
    return framework


async def _audit_log() -> None:
    """A dependency someone might add to a hot route (say, an audit trail)."""


def test_the_fast_path_serves_routes_with_the_dependencies_it_implements() -> None:
    framework = _framework_with({})
    HotPath(framework, framework)  # the routes as they are: accepted


@pytest.mark.parametrize("path", [CHECK, CHARGES, RESERVE, CAPTURE])
def test_the_fast_path_refuses_a_route_with_a_dependency_it_does_not_implement(
    path: str,
) -> None:
    framework = _framework_with({path: [Depends(_audit_log)]})
    with pytest.raises(HotPathMismatch, match=f"POST {path}: the route needs .*_audit_log"):
        HotPath(framework, framework)


def test_the_fast_path_refuses_a_router_dependency_and_a_missing_route() -> None:
    framework = FastAPI()
    framework.include_router(accounts_router, dependencies=[Depends(_audit_log)])
    with pytest.raises(HotPathMismatch, match="_audit_log"):
        HotPath(framework, framework)
    with pytest.raises(HotPathMismatch, match="0 framework routes"):
        HotPath(FastAPI(), FastAPI())


def test_the_service_refuses_to_start_when_a_hot_route_gains_a_dependency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    extra = _framework_with({CHARGES: [Depends(_audit_log)]})
    monkeypatch.setattr("ciris_billing.app.accounts_router", extra.router)
    with pytest.raises(HotPathMismatch, match="_audit_log"):
        create_app(make_settings("postgresql://unused@127.0.0.1/unused"))
    create_app(make_settings("postgresql://unused@127.0.0.1/unused"), hot_path=False)
