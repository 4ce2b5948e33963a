"""Issue 21, finding 12: open by default.

`/metrics` (purchase counts) answered anyone; `/docs` loaded Swagger UI from a CDN (blank
offline) with no Content-Security-Policy; `/export` had no `Cache-Control: no-store`. Now:
`/metrics` needs a read key or METRICS_TOKEN (as Prometheus' `authorization` sends it); the API
documentation stays public (SPEC) but its assets come from this service, with the console's
security headers; every answer that is not a static asset is `no-store`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from tests.support.api import Api, identity, make_settings, running_app

METRICS_TOKEN = "prometheus-scrape-token-0123456789"


@pytest.fixture
async def metered(database_url: str) -> AsyncIterator[Api]:
    async with running_app(make_settings(database_url, metrics_token=METRICS_TOKEN)) as api:
        yield api


async def test_finding12_metrics_need_a_read_key_or_the_metrics_token(metered: Api) -> None:
    anonymous = await metered.http.get("/metrics")
    assert anonymous.status_code == 401, anonymous.text
    assert anonymous.json()["error"] == "authentication_required"
    assert "billing_" not in anonymous.text
    wrong = await metered.http.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    # What Prometheus sends with `authorization: {type: Bearer, credentials: ...}`.
    scraped = await metered.http.get(
        "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
    )
    assert scraped.status_code == 200, scraped.text
    assert "billing_" in scraped.text
    assert scraped.headers["Cache-Control"] == "no-store"
    by_key = await metered.get("/metrics", scope="read")
    assert by_key.status_code == 200
    assert "billing_" in by_key.text


async def test_finding12_metrics_without_a_token_configured_need_a_read_key(api: Api) -> None:
    assert (await api.http.get("/metrics")).status_code == 401
    assert (await api.http.get("/metrics", headers={"Authorization": "Bearer "})).status_code == 401
    assert (await api.get("/metrics", scope="read")).status_code == 200


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_finding12_docs_are_public_and_load_nothing_from_elsewhere(
    api: Api, path: str
) -> None:
    page = await api.http.get(path)
    assert page.status_code == 200, page.text
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "frame-ancestors 'none'" in policy
    assert "cdn" not in page.text.lower()
    assert "<script>" not in page.text  # no inline script: script-src 'self' allows none
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources, page.text
    for source in sources:
        assert source.startswith("/"), source  # this service only
        asset = await api.http.get(source)
        assert asset.status_code == 200, source
        assert len(asset.content) > 100
        assert asset.headers["X-Content-Type-Options"] == "nosniff"


async def test_finding12_openapi_is_public_with_security_headers(api: Api) -> None:
    document = await api.http.get("/openapi.json")
    assert document.status_code == 200
    assert document.json()["info"]["title"] == "CIRIS Billing API"
    assert document.headers["X-Content-Type-Options"] == "nosniff"


async def test_finding12_personal_data_answers_are_not_stored(api: Api) -> None:
    user = identity("cache-me-not@example.com")
    created = await api.post(
        "/v1/billing/accounts", {**user, "customer_email": "cache-me-not@example.com"}
    )
    assert created.status_code == 201, created.text
    assert created.headers["Cache-Control"] == "no-store"
    base = f"/v1/billing/accounts/{user['oauth_provider']}/{user['external_id']}"
    export = await api.get(f"{base}/export", scope="admin")
    assert export.status_code == 200, export.text
    assert export.headers["Cache-Control"] == "no-store"
    for path, params in (
        (base, {}),
        ("/v1/billing/transactions", user),
        ("/v1/billing/reservations", user),
    ):
        answer = await api.get(path, **params)
        assert answer.status_code == 200, answer.text
        assert answer.headers["Cache-Control"] == "no-store", path
    check = await api.post("/v1/billing/credits/check", {**user, "context": {}}, scope="read")
    assert check.headers["Cache-Control"] == "no-store"
    refused = await api.http.get(base)  # an error too
    assert refused.status_code == 401
    assert refused.headers["Cache-Control"] == "no-store"
    assert (await api.audit()).clean
