"""Finding 12 (issue 12), the guide's own suite: a charge in another currency than the account's
was accepted silently. SPEC.md: a charge's currency must be the account's (422 otherwise), on
the fast path (accounts/hot) and the framework's route alike; a charge that names no currency
is in the account's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select

from ciris_billing.app import create_app
from ciris_billing.db import accounts, charges
from tests.support.api import Api, identity

CHARGES = "/v1/billing/charges"


@pytest.fixture
async def framework(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """The same service on the same database, every request through FastAPI's routes."""
    app = create_app(api.settings, hot_path=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://framework.test",
            headers={"X-API-Key": api.keys["write"]},
        ) as http,
    ):
        yield http


async def charged_currencies(api: Api, external_id: str) -> list[str]:
    async with api.engine.connect() as conn:
        rows = await conn.execute(
            select(charges.c.currency)
            .join(accounts, accounts.c.id == charges.c.account_id)
            .where(accounts.c.external_id == external_id)
            .order_by(charges.c.created_at)
        )
        return [row.currency for row in rows]


@pytest.mark.parametrize("side", ["fast", "framework"])
async def test_finding_12_charge_in_another_currency_is_422(
    api: Api, framework: httpx.AsyncClient, side: str
) -> None:
    client = api.http if side == "fast" else framework
    headers = api.headers("write")
    usd = identity(f"usd-{side}@example.com")
    eur = identity(f"eur-{side}@example.com")
    assert (await client.post("/v1/billing/accounts", json=usd, headers=headers)).status_code == 201
    created = await client.post(
        "/v1/billing/accounts", json={**eur, "currency": "EUR"}, headers=headers
    )
    assert created.json()["currency"] == "EUR"

    wrong = await client.post(
        CHARGES, json={**usd, "amount_minor": 100, "currency": "EUR"}, headers=headers
    )
    assert wrong.status_code == 422, wrong.text
    body = wrong.json()
    assert body["error"] == "currency_mismatch"
    assert "EUR" in body["detail"]
    assert "USD" in body["detail"]
    assert (body["currency"], body["account_currency"]) == ("EUR", "USD")
    keyed = await client.post(
        CHARGES,
        json={**eur, "currency": "USD"},
        headers={**headers, "Idempotency-Key": f"cur-{side}"},
    )
    assert keyed.status_code == 422, keyed.text

    right = await client.post(CHARGES, json={**usd, "currency": "USD"}, headers=headers)
    assert right.status_code == 201, right.text
    unnamed = await client.post(CHARGES, json=eur, headers=headers)  # the account's currency
    assert unnamed.status_code == 201, unnamed.text
    assert unnamed.json()["currency"] == "EUR"
    assert (unnamed.json()["free_uses_remaining"], unnamed.json()["total_uses"]) == (2, 1)
    assert await charged_currencies(api, usd["external_id"]) == ["USD"]
    assert await charged_currencies(api, eur["external_id"]) == ["EUR"]
    assert (await api.audit()).clean
