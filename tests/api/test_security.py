"""Walk every route of the service: each one needs a key (401) and its scope (403), except the
few that are public by design; and the logs of a whole purchase never hold a secret."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.routing import APIRoute

from ciris_billing.app import create_app
from tests.support.api import UNUSED_DATABASE_URL, Api, make_settings
from tests.support.console import CONSOLE_SESSION

# Public by design: liveness, the payment page (its secret is the payment's client secret),
# the buy link (signed), the webhooks (signed) and the sandbox's card confirmation.
PUBLIC = {
    "/health",
    "/v1/billing/webhooks/{provider_name}",
    "/v1/billing/checkout/{payment_id}",
    "/v1/billing/checkout/{payment_id}/summary",
    "/v1/billing/checkout/{payment_id}/sync",
    "/v1/billing/checkout/assets/checkout.js",
    "/v1/billing/checkout/assets/checkout.css",
    "/v1/billing/buy/{token}",
    "/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
    "/v1/billing/sandbox/payment_intents/{payment_id}/authenticate",
    # The customer portal (its link is signed) and the console's login form and assets.
    "/v1/billing/portal/{token}",
    "/v1/billing/portal/{token}/receipts/{payment_id}",
    "/v1/billing/portal/{token}/receipts/{payment_id}/pdf",
    "/v1/billing/portal/{token}/auto-topup",
    "/v1/billing/portal/{token}/card",
    "/console/login",
    "/console/static/{name}",
}
LOWER = {"write": "read", "admin": "write"}


def required_scope(route: APIRoute) -> str | None:
    for dependency in route.dependant.dependencies:
        scope = getattr(dependency.call, "required_scope", None)
        if scope is not None:
            return str(scope)
    return None


def api_routes(routes: list[Any]) -> list[APIRoute]:
    """Every APIRoute, including those of included routers (wrapped by FastAPI)."""
    found: list[APIRoute] = []
    for route in routes:
        if isinstance(route, APIRoute):
            found.append(route)
        elif hasattr(route, "original_router"):
            found.extend(api_routes(route.original_router.routes))
    return found


def billing_routes() -> list[tuple[str, str, str | None]]:
    app = create_app(make_settings(UNUSED_DATABASE_URL))
    return [
        (method, route.path, required_scope(route))
        for route in api_routes(app.routes)
        for method in sorted((route.methods or set()) - {"HEAD"})
    ]


ROUTES = billing_routes()


def test_every_route_is_protected_or_public_by_design() -> None:
    unprotected = {path for _, path, scope in ROUTES if scope is None}
    assert unprotected <= PUBLIC | CONSOLE_SESSION | {
        # The API documentation (SPEC: public); /metrics checks its own credentials.
        "/openapi.json",
        "/docs",
        "/docs/assets/{name}",
        "/redoc",
        "/metrics",
    }
    assert {path for _, path, _ in ROUTES} >= {
        "/v1/billing/charges",
        "/v1/billing/purchases/{payment_id}/refund",
    }


def concrete(path: str) -> str:
    return re.sub(
        r"\{(\w+)\}",
        lambda m: {"oauth_provider": "oauth:google"}.get(m.group(1), "x@example.com"),
        path,
    )


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [r for r in ROUTES if r[2] is not None],
    ids=[f"{m} {p}" for m, p, s in ROUTES if s is not None],
)
async def test_no_key_401_and_lower_scope_403(api: Api, method: str, path: str, scope: str) -> None:
    body: Any = {}
    no_key = await api.http.request(method, concrete(path), json=body)
    assert no_key.status_code == 401, no_key.text
    assert no_key.headers["WWW-Authenticate"].startswith('Bearer realm="ciris-billing"')
    revoked_looking = await api.http.request(
        method, concrete(path), json=body, headers={"Authorization": "Bearer cbk_revoked"}
    )
    assert revoked_looking.status_code == 401
    if scope in LOWER:
        lower = await api.http.request(
            method, concrete(path), json=body, headers=api.headers(LOWER[scope])
        )
        assert lower.status_code == 403, lower.text
        assert lower.json()["error"] == "insufficient_scope"
