"""Finding 12 (issue 12), the guide's own suite: a 401 came without a `WWW-Authenticate` header
(RFC 9110: a 401 must say how to authenticate). Every route of the OpenAPI document, fast path
and framework alike, is called with no key, an unknown key (as X-API-Key and as a Bearer
token) and a malformed Authorization header: every 401 names the scheme."""

from __future__ import annotations

import re

from ciris_billing import auth
from tests.support.api import Api

PARAMETER = re.compile(r"\{[^}]+\}")


async def test_finding_12_every_401_carries_www_authenticate(api: Api) -> None:
    document = (await api.http.get("/openapi.json")).json()
    routes = [
        (method.upper(), PARAMETER.sub("x", path))
        for path, operations in document["paths"].items()
        for method in operations
        if method in ("get", "post", "put", "patch", "delete")
    ]
    assert ("POST", "/v1/billing/charges") in routes
    credentials: list[dict[str, str]] = [
        {},
        {"X-API-Key": "cbk_not-a-real-key"},
        {"Authorization": "Bearer cbk_not-a-real-key"},
        {"Authorization": "Basic Zm9vOmJhcg=="},
    ]
    unauthorized = set()
    for method, path in routes:
        for headers in credentials:
            response = await api.http.request(method, path, json={}, headers=headers)
            if response.status_code == 401:
                unauthorized.add((method, path))
                assert response.headers.get("WWW-Authenticate") == auth.WWW_AUTHENTICATE, (
                    method,
                    path,
                    headers,
                )
                assert response.json()["error"] == "authentication_required"
    # Every route but health, metrics, webhooks, checkout pages and the sandbox's customer side.
    assert {("POST", "/v1/billing/charges"), ("POST", "/v1/billing/credits/check")} <= unauthorized
    assert len(unauthorized) >= 15, sorted(unauthorized)
