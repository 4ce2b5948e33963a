"""Bad input gets a 4xx with the one JSON error shape, never a 500, and changes nothing."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.api import Api, identity

GOOD = {**identity("valid@example.com"), "amount_minor": 100, "currency": "USD", "metadata": {}}

BAD_CHARGES: list[tuple[str, Any]] = [
    ("missing identity", {"amount_minor": 100}),
    ("unknown provider format", {**GOOD, "oauth_provider": "google"}),
    ("provider with spaces", {**GOOD, "oauth_provider": "oauth:goo gle"}),
    ("empty external id", {**GOOD, "external_id": ""}),
    ("blank external id", {**GOOD, "external_id": "   "}),
    ("slash in external id", {**GOOD, "external_id": "a/b"}),
    ("control char in external id", {**GOOD, "external_id": "a\u0000b"}),
    ("too long external id", {**GOOD, "external_id": "x" * 256}),
    ("negative amount", {**GOOD, "amount_minor": -1}),
    ("absurd amount", {**GOOD, "amount_minor": 10**15}),
    ("float amount", {**GOOD, "amount_minor": 1.5}),
    ("string amount", {**GOOD, "amount_minor": "100"}),
    ("bool amount", {**GOOD, "amount_minor": True}),
    ("zero uses", {**GOOD, "uses": 0}),
    ("negative uses", {**GOOD, "uses": -3}),
    ("absurd uses", {**GOOD, "uses": 10**9}),
    ("bad currency", {**GOOD, "currency": "DOLLARS"}),
    ("numeric currency", {**GOOD, "currency": "123"}),
    ("metadata not an object", {**GOOD, "metadata": ["a"]}),
    ("nested metadata", {**GOOD, "metadata": {"a": {"b": 1}}}),
    ("too many metadata keys", {**GOOD, "metadata": {f"k{i}": i for i in range(51)}}),
    ("metadata value too long", {**GOOD, "metadata": {"k": "v" * 501}}),
    ("metadata key too long", {**GOOD, "metadata": {"k" * 41: "v"}}),
    ("description too long", {**GOOD, "description": "d" * 501}),
    ("body is a list", [GOOD]),
    ("body is a string", "charge please"),
    ("body is null", None),
]


@pytest.mark.parametrize(("_case", "body"), BAD_CHARGES, ids=[c for c, _ in BAD_CHARGES])
async def test_bad_charge_is_422(api: Api, _case: str, body: Any) -> None:
    response = await api.post("/v1/billing/charges", body)
    assert response.status_code == 422
    error = response.json()
    assert error["error"] == "validation_error"
    assert error["detail"]
    assert (await api.post("/v1/billing/credits/check", identity("valid@example.com"))).json()[
        "total_uses"
    ] == 0


async def test_malformed_json_is_422(api: Api) -> None:
    response = await api.http.post(
        "/v1/billing/charges",
        content=b'{"oauth_provider": "oauth:google",',
        headers=api.headers(**{"Content-Type": "application/json"}),
    )
    assert response.status_code == 422
    assert response.json()["error"] == "validation_error"


async def test_form_body_says_to_send_json(api: Api) -> None:
    response = await api.http.post(
        "/v1/billing/credits/check", content=b"oauth_provider=x", headers=api.headers()
    )
    assert response.status_code == 422
    assert "JSON" in response.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        {**identity(), "initial_balance_minor": -5},
        {**identity(), "initial_balance_minor": 10**12},
        {**identity(), "customer_email": "not-an-email"},
        {**identity(), "plan_name": "Free Plan!"},
    ],
)
async def test_bad_account_is_422(api: Api, body: dict[str, Any]) -> None:
    assert (await api.post("/v1/billing/accounts", body)).status_code == 422


@pytest.mark.parametrize(
    "path",
    [
        "/v1/billing/accounts/google/user@example.com",
        "/v1/billing/accounts/oauth:google/%20",
        "/v1/billing/transactions?oauth_provider=oauth:google",
        "/v1/billing/transactions?oauth_provider=oauth:google&external_id=a&limit=0",
        "/v1/billing/transactions?oauth_provider=oauth:google&external_id=a&limit=100000",
        "/v1/billing/transactions?oauth_provider=oauth:google&external_id=a&offset=-1",
    ],
)
async def test_bad_lookups_are_4xx(api: Api, path: str) -> None:
    response = await api.http.get(path, headers=api.headers("read"))
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"


async def test_unknown_route_and_method_use_the_error_shape(api: Api) -> None:
    missing = await api.http.get("/v1/billing/nothing-here", headers=api.headers())
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    wrong = await api.http.delete("/v1/billing/charges", headers=api.headers())
    assert wrong.status_code == 405
    assert wrong.json()["error"] == "method_not_allowed"


async def test_bad_idempotency_key_is_422(api: Api) -> None:
    response = await api.post("/v1/billing/charges", GOOD, **{"Idempotency-Key": "k" * 300})
    assert response.status_code == 422
