"""Issue 21, findings 1 and 13: nothing the service cannot store or does not know gets in.

Finding 1: text PostgreSQL cannot store (a NUL character, a lone surrogate) is refused with 422
at the edge, on every route and field, the fast path's included; it used to be taken (201) and
fail every capture after it (500). Finding 13: a field no request body names is refused with
422 naming it (`{"usses": 5}` charged 1 use; `{"ttl": 5}` on a hold became 300 s), and the
OpenAPI schema says so (`additionalProperties: false`).

Request in, response out, and the ledger invariant (`await api.audit()`) after.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from ciris_billing.app import create_app
from ciris_billing.request_body import RequestBody
from tests.api.test_security import api_routes
from tests.support.api import UNUSED_DATABASE_URL, Api, identity, make_settings

CHECK = "/v1/billing/credits/check"
CHARGES = "/v1/billing/charges"
RESERVE = "/v1/billing/reservations"
ACCOUNTS = "/v1/billing/accounts"
WHO = identity("strict@example.com")


async def _account(api: Api, who: dict[str, str] = WHO) -> dict[str, Any]:
    made = await api.post(ACCOUNTS, {**who, "initial_balance_minor": 5}, scope="admin")
    assert made.status_code in (200, 201), made.text
    body: dict[str, Any] = made.json()
    return body


async def _hold(api: Api) -> str:
    held = await api.post(RESERVE, {**WHO, "uses": 1})
    assert held.status_code == 201, held.text
    return str(held.json()["reservation_id"])


async def _used(api: Api) -> int:
    found = await api.get(f"{ACCOUNTS}/{WHO['oauth_provider']}/{WHO['external_id']}")
    assert found.status_code == 200, found.text
    used: int = found.json()["total_uses"]
    return used


def _raw(api: Api, text: str) -> dict[str, str]:
    return {**api.headers("admin"), "Content-Type": "application/json"}


# --- finding 13: unknown fields ------------------------------------------------------------


async def test_finding13_unknown_field_on_a_charge_is_refused_naming_it(api: Api) -> None:
    await _account(api)

    answer = await api.post(CHARGES, {**WHO, "usses": 5})  # the fast path's route

    assert answer.status_code == 422, answer.text
    assert "usses" in answer.json()["detail"]
    assert [e["field"] for e in answer.json()["errors"]] == ["usses"]
    assert await _used(api) == 0, "nothing was charged"
    assert (await api.audit()).clean


async def test_finding13_unknown_field_on_a_hold_is_refused_naming_it(api: Api) -> None:
    await _account(api)

    answer = await api.post(RESERVE, {**WHO, "ttl": 5})

    assert answer.status_code == 422, answer.text
    assert "ttl" in answer.json()["detail"]
    listed = await api.get(RESERVE, **WHO)
    assert listed.json()["reservations"] == [], "no hold was made"
    assert (await api.audit()).clean


@pytest.mark.parametrize(
    ("path", "body", "scope", "unknown"),
    [
        (CHECK, {**WHO, "contxt": {}}, "read", "contxt"),
        (ACCOUNTS, {**WHO, "plan": "pro"}, "admin", "plan"),
        (f"{RESERVE}/{{hold}}/capture", {"usess": 1}, "write", "usess"),
        ("/v1/billing/credits", {**WHO, "uses": 1, "reason": "x", "note": "y"}, "admin", "note"),
        (f"{ACCOUNTS}/{{who}}/suspend", {"reason": "x", "why": "y"}, "admin", "why"),
        (f"{ACCOUNTS}/{{who}}/low_balance_threshold", {"uses": 1, "use": 2}, "admin", "use"),
        (f"{ACCOUNTS}/{{who}}/auto_topup", {"enabled": False, "enable": True}, "write", "enable"),
        ("/v1/billing/purchases", {**WHO, "pack": 5}, "write", "pack"),
        ("/v1/billing/webhook_endpoints", {"url": "https://e.example.com/", "u": 1}, "admin", "u"),
    ],
)
async def test_finding13_unknown_field_is_refused_on_every_route(
    api: Api, path: str, body: dict[str, Any], scope: str, unknown: str
) -> None:
    await _account(api)
    who = f"{WHO['oauth_provider']}/{WHO['external_id']}"
    path = path.replace("{who}", who)
    if "{hold}" in path:
        path = path.replace("{hold}", await _hold(api))
    method = "PUT" if path.endswith(("low_balance_threshold", "auto_topup")) else "POST"
    answer = await api.http.request(method, path, json=body, headers=api.headers(scope))

    assert answer.status_code == 422, answer.text
    assert [error["field"] for error in answer.json()["errors"]] == [unknown], answer.text
    assert (await api.audit()).clean


def _request_models() -> list[type[BaseModel]]:
    app = create_app(make_settings(UNUSED_DATABASE_URL))
    found: list[type[BaseModel]] = []
    for route in api_routes(app.routes):
        for field in route.dependant.body_params:
            annotation = field.field_info.annotation
            for model in getattr(annotation, "__args__", (annotation,)):
                if isinstance(model, type) and issubclass(model, BaseModel):
                    found.append(model)
    return found


def test_finding13_every_request_body_is_a_strict_request_body() -> None:
    models = _request_models()
    assert len(models) >= 10
    loose = [m.__qualname__ for m in models if not issubclass(m, RequestBody)]
    assert loose == [], "request bodies must derive from request_body.RequestBody"


def test_finding13_openapi_says_additional_properties_false() -> None:
    app = create_app(make_settings(UNUSED_DATABASE_URL))
    schema = app.openapi()
    schemas = schema["components"]["schemas"]
    bodies: set[str] = set()
    for item in schema["paths"].values():
        for operation in item.values():
            content = operation.get("requestBody", {}).get("content", {})
            for media in content.values():
                ref = media["schema"].get("$ref")
                if ref is None:
                    for option in media["schema"].get("anyOf", []):
                        if "$ref" in option:
                            bodies.add(option["$ref"].rsplit("/", 1)[1])
                else:
                    bodies.add(ref.rsplit("/", 1)[1])
    assert len(bodies) >= 10
    for name in bodies:
        assert schemas[name].get("additionalProperties") is False, name


# --- finding 1: text PostgreSQL cannot store ------------------------------------------------

NUL = "a\u0000b"
SURROGATE = '"a\\ud800b"'  # a lone surrogate only JSON's escape can carry


async def test_finding1_nul_in_hold_metadata_is_refused_and_captures_still_work(
    api: Api,
) -> None:
    await _account(api)

    poisoned = await api.post(RESERVE, {**WHO, "metadata": {"k": NUL}})

    assert poisoned.status_code == 422, poisoned.text
    assert "NUL" in poisoned.json()["detail"]
    hold = await _hold(api)
    captured = await api.post(f"{RESERVE}/{hold}/capture", {})
    assert captured.status_code == 201, captured.text
    assert (await api.audit()).clean


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (CHARGES, {**WHO, "metadata": {"k": NUL}}),  # fast path
        (CHARGES, {**WHO, "metadata": {NUL: "v"}}),  # a key
        (CHARGES, {**WHO, "description": NUL}),
        (CHECK, {**WHO, "context": {"deep": [{"x": NUL}]}}),
        (CHECK, {"oauth_provider": "oauth:google", "external_id": NUL}),
        (RESERVE, {"oauth_provider": "oauth:google", "external_id": NUL}),
        (f"{RESERVE}/{{hold}}/capture", {"description": NUL}),
        (f"{RESERVE}/{{hold}}/capture", {"metadata": {"k": NUL}}),
        (ACCOUNTS, {**identity("other@example.com"), "display_name": NUL}),
        ("/v1/billing/credits", {**WHO, "uses": 1, "reason": NUL}),
        (f"{ACCOUNTS}/{{who}}/suspend", {"reason": NUL}),
        ("/v1/billing/purchases", {**WHO, "customer_email": f"a{NUL}@example.com"}),
    ],
)
async def test_finding1_nul_is_refused_on_every_route_and_field(
    api: Api, path: str, body: dict[str, Any]
) -> None:
    await _account(api)
    path = path.replace("{who}", f"{WHO['oauth_provider']}/{WHO['external_id']}")
    if "{hold}" in path:
        path = path.replace("{hold}", await _hold(api))
    used = await _used(api)

    answer = await api.post(path, body, scope="admin")

    assert answer.status_code == 422, answer.text
    assert "NUL" in answer.json()["detail"]
    assert await _used(api) == used
    assert (await api.audit()).clean


@pytest.mark.parametrize("path", [CHARGES, RESERVE, CHECK, ACCOUNTS])
async def test_finding1_lone_surrogate_is_refused(api: Api, path: str) -> None:
    await _account(api)
    body = (
        '{"oauth_provider": "oauth:google", "external_id": "strict@example.com", '
        f'"metadata": {{"k": {SURROGATE}}}}}'
        if path in (CHARGES, RESERVE)
        else f'{{"oauth_provider": "oauth:google", "external_id": {SURROGATE}}}'
    )

    answer = await api.http.post(path, content=body, headers=_raw(api, body))

    assert answer.status_code == 422, answer.text
    assert "surrogate" in answer.json()["detail"]
    assert (await api.audit()).clean


@pytest.mark.parametrize(
    "path",
    [
        f"{ACCOUNTS}/oauth:google/a%00b",
        f"{ACCOUNTS}/oauth:google/a%00b/transactions",
        f"{RESERVE}?oauth_provider=oauth:google&external_id=a%00b",
    ],
)
async def test_finding1_nul_in_the_url_is_refused(api: Api, path: str) -> None:
    answer = await api.http.get(path, headers=api.headers("admin"))

    assert answer.status_code == 422, answer.text
    assert "NUL" in answer.json()["detail"]


async def test_finding1_an_escaped_backslash_u0000_is_ordinary_text(api: Api) -> None:
    await _account(api)
    body = '{"oauth_provider": "oauth:google", "external_id": "strict@example.com", '
    body += '"metadata": {"k": "a\\\\u0000b"}}'  # the six characters \u0000, not NUL

    answer = await api.http.post(CHARGES, content=body, headers=_raw(api, body))

    assert answer.status_code == 201, answer.text
    assert answer.json()["metadata"] == {"k": "a\\u0000b"}
    assert (await api.audit()).clean
