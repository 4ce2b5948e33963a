"""Issue 24: the Python agent client buys a named pack with a promotion code (new keyword
arguments; its purchase() without them is the guide's, unchanged)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.agent import BASE, GOOGLE, InProcess, serving, user


@pytest.fixture
async def billing(database_url: str) -> AsyncIterator[InProcess]:
    async with serving(database_url, InProcess) as served:
        yield served


async def test_the_client_buys_a_pack_with_a_code(billing: InProcess) -> None:
    async with httpx.AsyncClient(transport=billing.network.app, base_url=BASE) as http:
        admin = {"X-API-Key": billing.keys["admin"]}
        pack = {"pack_id": "big", "name": "50 uses", "uses": 50, "price_minor": 900,
                "currency": "USD"}  # fmt: skip
        assert (await http.post("/v1/billing/packs", json=pack, headers=admin)).status_code == 201
        code = {"code": "TENOFF", "amount_off_minor": 100}
        made = await http.post("/v1/billing/promotion_codes", json=code, headers=admin)
        assert made.status_code == 201
    client, who = billing.client(), user()
    bought = await client.purchase(GOOGLE, who, pack_id="big", promotion_code="TENOFF")
    assert (bought.amount_minor, bought.uses_purchased) == (800, 50)
    assert bought.raw["pack_id"] == "big"
    assert bought.raw["promotion_code"] == "TENOFF"
    assert bought.client_secret is not None
    paid = await billing.confirm(bought.payment_id, bought.client_secret)
    assert paid.json()["status"] == "succeeded"
    assert (await client.check(GOOGLE, who)).credits_remaining == 50
