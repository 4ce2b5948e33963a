"""The console's outgoing webhooks: a failing delivery shows on the overview and the endpoints
page; resending it and disabling or enabling the endpoint go through the events service (as the
API and `ciris-billing webhook-endpoints`) and land in the audit trail."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from ciris_billing.db import webhook_deliveries, webhook_endpoints
from ciris_billing.events.delivery import Deliveries
from tests.support.api import Api, identity, make_settings, running_app
from tests.support.console import Console, trail

NOBODY_LISTENS = "http://127.0.0.1:9/hooks"  # the discard port: connection refused


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    settings = make_settings(database_url, allow_private_webhook_urls=True)
    async with running_app(settings) as api:
        yield api


@pytest.fixture
async def console(api: Api) -> Console:
    assert (await Console(api.http).sign_in(api.keys["admin"])).status_code == 303
    return Console(api.http)


async def failing_delivery(api: Api) -> tuple[str, str]:
    """An endpoint nobody answers, and one delivery to it that failed once: (endpoint, delivery)."""
    made = await api.post("/v1/billing/webhook_endpoints", {"url": NOBODY_LISTENS}, "admin")
    assert made.status_code == 201, made.text
    endpoint_id = made.json()["id"]
    await api.post("/v1/billing/accounts", identity("hooked@example.com"))
    deliveries = Deliveries(api.engine, api.settings)
    try:
        report = await deliveries.run_once()
    finally:
        await deliveries.aclose()
    assert report.delivered == 0, report
    async with api.engine.connect() as conn:
        delivery = (await conn.execute(select(webhook_deliveries))).first()
    assert delivery is not None
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    return endpoint_id, delivery.id


async def test_a_failing_delivery_is_shown_and_resent(api: Api, console: Console) -> None:
    endpoint_id, delivery_id = await failing_delivery(api)
    overview = await api.http.get("/console")
    assert 'id="deliveries-failing">1</a>' in overview.text
    assert "(1 endpoints failing or disabled)" in overview.text
    page = await api.http.get("/console/endpoints")
    assert NOBODY_LISTENS in page.text
    assert delivery_id in page.text
    assert "retrying" in page.text
    resent = await console.act(
        "resend_delivery", {"endpoint_id": endpoint_id, "delivery_id": delivery_id}
    )
    assert resent.status_code == 303
    assert resent.headers["location"].startswith("/console/endpoints?notice=aud_")
    [entry] = await trail(api.engine, door="console")  # the endpoint was made by the API
    assert (entry.actor, entry.action, entry.subject) == (
        "test-admin",
        "resend_delivery",
        delivery_id,
    )
    assert entry.detail["endpoint_id"] == endpoint_id
    async with api.engine.connect() as conn:
        row = (
            await conn.execute(
                select(webhook_deliveries).where(webhook_deliveries.c.id == delivery_id)
            )
        ).one()
    assert row.status == "pending"
    assert row.next_attempt_at <= entry.created_at  # due now


async def test_disable_then_enable_an_endpoint(api: Api, console: Console) -> None:
    endpoint_id, _delivery = await failing_delivery(api)
    page = await console.confirmation("disable_endpoint", {"endpoint_id": endpoint_id})
    assert "Disable this endpoint?" in page.text
    assert NOBODY_LISTENS in page.text
    assert (await console.confirm("disable_endpoint", page.text)).status_code == 303
    shown = await api.get(f"/v1/billing/webhook_endpoints/{endpoint_id}", "admin")
    assert (shown.json()["status"], shown.json()["disabled_reason"]) == (
        "disabled",
        "disabled by an operator",
    )
    assert (await console.act("enable_endpoint", {"endpoint_id": endpoint_id})).status_code == 303
    async with api.engine.connect() as conn:
        status = await conn.scalar(
            select(webhook_endpoints.c.status).where(webhook_endpoints.c.id == endpoint_id)
        )
    assert status == "enabled"
    entries = await trail(api.engine, door="console")
    assert [(e.action, e.before["status"], e.after["status"]) for e in entries] == [
        ("disable_endpoint", "enabled", "disabled"),
        ("enable_endpoint", "disabled", "enabled"),
    ]


async def test_an_unknown_endpoint_is_refused(api: Api, console: Console) -> None:
    page = await console.confirmation("disable_endpoint", {"endpoint_id": "we_nope"})
    assert page.status_code == 422
    assert await trail(api.engine, door="console") == []


async def test_without_endpoints_the_page_says_so(api: Api, console: Console) -> None:
    page = await api.http.get("/console/endpoints")
    assert page.status_code == 200
    assert "No webhook endpoint." in page.text
    assert 'id="deliveries-failing">0</a>' in (await api.http.get("/console")).text
