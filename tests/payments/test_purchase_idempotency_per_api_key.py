"""Finding 7, "Idempotency keys leak across API keys", for purchases: a second API key sending
the same Idempotency-Key and body got the first key's stored purchase response, client_secret
included. Keys are scoped to the API key (SPEC.md): two purchases, two client secrets."""

from __future__ import annotations

from typing import Any

import httpx

from ciris_billing import auth
from tests.support.api import Api, identity

PURCHASES = "/v1/billing/purchases"
USER = identity("buyer-two-keys@example.com")
BODY = {**USER, "customer_email": USER["external_id"]}


async def buy(api: Api, key: str, body: Any, idem: str = "msg-001") -> httpx.Response:
    headers = {"X-API-Key": key, "Idempotency-Key": idem}
    return await api.http.post(PURCHASES, json=body, headers=headers)


async def test_finding_7_purchase_same_key_from_two_api_keys_leaks_nothing(api: Api) -> None:
    mine = api.keys["write"]
    async with api.engine.begin() as conn:
        _key_id, theirs = await auth.create_key(conn, "other integration", frozenset({"write"}))

    first = await buy(api, mine, BODY)
    other = await buy(api, theirs, BODY)

    assert first.status_code == other.status_code == 201, other.text
    assert "Idempotent-Replayed" not in other.headers
    assert other.json()["purchase_id"] != first.json()["purchase_id"]
    assert other.json()["payment_id"] != first.json()["payment_id"]
    assert first.json()["client_secret"] not in other.text  # no leak of the first key's secret
    # Each API key's retry replays its own purchase.
    again, theirs_again = await buy(api, mine, BODY), await buy(api, theirs, BODY)
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert theirs_again.json() == other.json()
    assert first.json()["client_secret"] not in theirs_again.text
    # A different request under a key this API key already used: 409.
    different = await buy(api, theirs, {**BODY, "customer_email": "else@example.com"})
    assert different.status_code == 409
    assert (await api.audit()).clean
