"""The agent client charges by `feature=` / `quantity=` (issue 24 item 3)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.support.agent import BASE, GOOGLE, InProcess, serving, user


@pytest.fixture
async def billing(database_url: str) -> AsyncIterator[InProcess]:
    async with serving(database_url, InProcess) as served:
        yield served


async def test_the_client_charges_by_feature_and_quantity(billing: InProcess) -> None:
    async with httpx.AsyncClient(transport=billing.network.app, base_url=BASE) as http:
        made = await http.post(
            "/v1/billing/rates",
            json={"feature": "gpt-4o-tokens", "units_per_use": 1000, "rounding": "carry"},
            headers={"X-API-Key": billing.keys["admin"]},
        )
        assert made.status_code == 200, made.text
    client, who = billing.client(), user()
    await client.check(GOOGLE, who)
    charged = [
        await client.charge(GOOGLE, who, feature="gpt-4o-tokens", quantity=600) for _ in range(3)
    ]
    assert [c.uses for c in charged] == [0, 1, 0]
    assert {(c.feature, c.quantity) for c in charged} == {("gpt-4o-tokens", 600)}
    assert charged[-1].total_uses == 1
    with pytest.raises(ValueError, match="together"):
        await client.charge(GOOGLE, who, feature="gpt-4o-tokens")
    with pytest.raises(ValueError, match="not both"):
        await client.charge(GOOGLE, who, uses=2, feature="gpt-4o-tokens", quantity=5)
