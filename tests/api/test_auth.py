"""API keys: 401 without a valid key, 403 without the scope, revocation takes effect."""

from __future__ import annotations

import pytest

from ciris_billing import auth
from tests.support.api import Api, identity

PROTECTED = [
    ("POST", "/v1/billing/accounts", "write"),
    ("GET", "/v1/billing/accounts/oauth:google/user@example.com", "read"),
    ("POST", "/v1/billing/credits/check", "read"),
    ("POST", "/v1/billing/charges", "write"),
    ("GET", "/v1/billing/transactions?oauth_provider=oauth:google&external_id=a", "read"),
]


@pytest.mark.parametrize(("method", "path", "_scope"), PROTECTED)
async def test_no_key_or_wrong_key_is_401(api: Api, method: str, path: str, _scope: str) -> None:
    for headers in ({}, {"X-API-Key": "cbk_not-a-real-key"}, {"Authorization": "Bearer nope"}):
        response = await api.http.request(method, path, json=identity(), headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"] == "authentication_required"


async def test_read_key_cannot_charge(api: Api) -> None:
    response = await api.post("/v1/billing/charges", identity(), scope="read")
    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"


async def test_scopes_include_lower_ones(api: Api) -> None:
    for scope in ("read", "write", "admin"):
        check = await api.post("/v1/billing/credits/check", identity(), scope=scope)
        assert check.status_code == 200
    assert (await api.post("/v1/billing/charges", identity(), scope="admin")).status_code == 201


async def test_bearer_header_is_accepted(api: Api) -> None:
    response = await api.http.post(
        "/v1/billing/credits/check",
        json=identity(),
        headers={"Authorization": f"Bearer {api.keys['read']}"},
    )
    assert response.status_code == 200


async def test_health_needs_no_key(api: Api) -> None:
    assert (await api.http.get("/health")).status_code == 200


async def test_revoked_key_stops_working(database_url: str) -> None:
    from tests.support.api import make_settings

    settings = make_settings(database_url, api_key_cache_seconds=0)
    from ciris_billing.app import create_app

    app = create_app(settings)
    import httpx

    async with app.router.lifespan_context(app):
        engine = app.state.billing.engine
        async with engine.begin() as conn:
            key_id, key = await auth.create_key(conn, "soon revoked", frozenset({"read"}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            ok = await http.post(
                "/v1/billing/credits/check", json=identity(), headers={"X-API-Key": key}
            )
            assert ok.status_code == 200
            async with engine.begin() as conn:
                assert await auth.revoke_key(conn, key_id)
            denied = await http.post(
                "/v1/billing/credits/check", json=identity(), headers={"X-API-Key": key}
            )
            assert denied.status_code == 401


def test_keys_are_stored_as_digests_only() -> None:
    assert auth.hash_key("cbk_x") != "cbk_x"
    assert len(auth.hash_key("cbk_x")) == 64
