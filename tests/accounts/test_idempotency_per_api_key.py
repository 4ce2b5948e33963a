"""Finding 7, "Idempotency keys leak across API keys": keys are scoped to the API key that sent
them (SPEC.md). Two integrations that both use the README's `msg-001` get two independent
effects and answers; the same key from the same API key still replays, and a different request
under it is still a 409. Charges (the fast path) and grants (operator routes) here; purchases in
tests/payments/test_purchase_idempotency_per_api_key.py.
"""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import text

from ciris_billing import auth
from tests.support.api import Api, identity

CHARGES, GRANTS = "/v1/billing/charges", "/v1/billing/credits"
USER = identity("two-integrations@example.com")
CHARGE = {**USER, "amount_minor": 100, "description": "Agent interaction"}


async def second_key(api: Api, scope: str) -> str:
    """Another integration's API key, with the same scope as the fixture's."""
    async with api.engine.begin() as conn:
        _key_id, key = await auth.create_key(conn, f"other-{scope}", frozenset({scope}))
    return key


async def send(api: Api, key: str, path: str, body: Any, idem: str) -> httpx.Response:
    return await api.http.post(path, json=body, headers={"X-API-Key": key, "Idempotency-Key": idem})


async def uses(api: Api) -> dict[str, Any]:
    answer: dict[str, Any] = (await api.post("/v1/billing/credits/check", USER, "read")).json()
    return answer


async def test_finding_7_charges_same_key_from_two_api_keys_are_two_charges(api: Api) -> None:
    mine, theirs = api.keys["write"], await second_key(api, "write")

    first = await send(api, mine, CHARGES, CHARGE, "msg-001")
    other = await send(api, theirs, CHARGES, CHARGE, "msg-001")

    assert first.status_code == other.status_code == 201, other.text
    assert "Idempotent-Replayed" not in other.headers
    assert other.json()["charge_id"] != first.json()["charge_id"]
    assert (await uses(api))["total_uses"] == 2  # two effects
    # Each API key's retry replays its own charge, and only that.
    again = await send(api, mine, CHARGES, CHARGE, "msg-001")
    theirs_again = await send(api, theirs, CHARGES, CHARGE, "msg-001")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert theirs_again.json() == other.json()
    # A different request under a key already used by this API key is still a 409.
    different = await send(api, theirs, CHARGES, {**CHARGE, "amount_minor": 200}, "msg-001")
    assert different.status_code == 409
    assert different.json()["error"] == "idempotency_key_reused"
    assert (await uses(api))["total_uses"] == 2
    assert (await api.audit()).clean


async def test_finding_7_grants_same_key_from_two_admin_keys_are_two_grants(api: Api) -> None:
    mine, theirs = api.keys["admin"], await second_key(api, "admin")
    grant = {**USER, "uses": 5, "reason": "goodwill"}

    first = await send(api, mine, GRANTS, grant, "msg-001")
    other = await send(api, theirs, GRANTS, grant, "msg-001")

    assert first.status_code == other.status_code == 201, other.text
    assert "Idempotent-Replayed" not in other.headers
    assert first.json()["account"]["credits_remaining"] == 5
    assert other.json()["account"]["credits_remaining"] == 10  # its own effect, its own answer
    again = await send(api, mine, GRANTS, grant, "msg-001")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    different = await send(api, mine, GRANTS, {**grant, "uses": 6}, "msg-001")
    assert different.status_code == 409
    assert (await uses(api))["credits_remaining"] == 10
    assert (await api.audit()).clean


async def test_finding_7_a_key_one_api_key_used_for_a_charge_is_free_for_another(
    api: Api,
) -> None:
    # The same key on the other kind of request: a 409 only within one API key.
    charged = await send(api, api.keys["write"], CHARGES, CHARGE, "msg-002")
    admin = api.keys["admin"]
    granted = await send(api, admin, GRANTS, {**USER, "uses": 1, "reason": "r"}, "msg-002")
    assert charged.status_code == granted.status_code == 201, granted.text
    account = {**USER, "plan_name": "free"}
    mixed = await send(api, api.keys["write"], "/v1/billing/accounts", account, "msg-002")
    assert mixed.status_code == 409
    assert (await api.audit()).clean


async def test_finding_7_keys_from_before_scoping_stay_taken_for_every_api_key(api: Api) -> None:
    # What migration 0007 leaves of keys used before scoping: a request's key and a charge's key
    # (the charge's also copied into idempotency_keys), both under no API key ('').
    first = await send(api, api.keys["write"], CHARGES, CHARGE, "old-charge")
    assert first.status_code == 201
    async with api.engine.begin() as conn:
        await conn.execute(
            text("UPDATE charges SET api_key_id = '' WHERE idempotency_key = 'old-charge'")
        )
        await conn.execute(
            text(
                "INSERT INTO idempotency_keys (api_key_id, key, fingerprint, response_status,"
                " response_body, created_at) VALUES ('', 'old-charge', '', 0, '', now()),"
                " ('', 'old-request', 'f', 201, '{}', now())"
            )
        )
    for idem in ("old-charge", "old-request"):
        for key in (api.keys["write"], await second_key(api, "write")):
            again = await send(api, key, CHARGES, CHARGE, idem)
            assert again.status_code == 409, again.text  # never replayed, never charged again
        account = await send(api, api.keys["write"], "/v1/billing/accounts", USER, idem)
        assert account.status_code == 409
    assert (await uses(api))["total_uses"] == 1
    assert (await api.audit()).clean
