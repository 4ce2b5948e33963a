"""Retries with an Idempotency-Key replay the first response; a reused key is a 409."""

from __future__ import annotations

import asyncio

from tests.support.api import Api, identity

CHARGE = {**identity("retry@example.com"), "amount_minor": 100, "description": "Agent interaction"}


async def test_same_key_same_request_replays_the_charge(api: Api) -> None:
    first = await api.post("/v1/billing/charges", CHARGE, **{"Idempotency-Key": "msg-001"})
    again = await api.post("/v1/billing/charges", CHARGE, **{"Idempotency-Key": "msg-001"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    check = await api.post("/v1/billing/credits/check", identity("retry@example.com"))
    assert check.json()["total_uses"] == 1


async def test_body_field_idempotency_key_works_like_the_header(api: Api) -> None:
    body = {**CHARGE, "idempotency_key": "body-key-1"}
    first = await api.post("/v1/billing/charges", body)
    again = await api.post("/v1/billing/charges", body)
    via_header = await api.post("/v1/billing/charges", CHARGE, **{"Idempotency-Key": "body-key-1"})
    assert first.json()["charge_id"] == again.json()["charge_id"] == via_header.json()["charge_id"]


async def test_same_key_different_request_is_409(api: Api) -> None:
    await api.post("/v1/billing/charges", CHARGE, **{"Idempotency-Key": "k-409"})
    other = await api.post(
        "/v1/billing/charges", {**CHARGE, "amount_minor": 200}, **{"Idempotency-Key": "k-409"}
    )
    assert other.status_code == 409
    assert other.json()["error"] == "idempotency_key_reused"
    elsewhere = await api.post(
        "/v1/billing/accounts", identity("someone@example.com"), **{"Idempotency-Key": "k-409"}
    )
    assert elsewhere.status_code == 409


async def test_header_and_body_keys_must_agree(api: Api) -> None:
    response = await api.post(
        "/v1/billing/charges", {**CHARGE, "idempotency_key": "a"}, **{"Idempotency-Key": "b"}
    )
    assert response.status_code == 422


async def test_concurrent_retries_charge_once(api: Api) -> None:
    responses = await asyncio.gather(
        *(
            api.post("/v1/billing/charges", CHARGE, **{"Idempotency-Key": "storm"})
            for _ in range(20)
        )
    )
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["charge_id"] for r in responses}) == 1
    check = await api.post("/v1/billing/credits/check", identity("retry@example.com"))
    assert check.json()["total_uses"] == 1
    assert (await api.audit()).clean


async def test_a_refused_charge_does_not_burn_its_key(api: Api) -> None:
    user = identity("broke@example.com")
    for _ in range(3):
        await api.post("/v1/billing/charges", user)
    refused = await api.post("/v1/billing/charges", user, **{"Idempotency-Key": "after-topup"})
    assert refused.status_code == 402
    await api.post("/v1/billing/accounts", user)  # existing: grants nothing
    again = await api.post("/v1/billing/charges", user, **{"Idempotency-Key": "after-topup"})
    assert again.status_code == 402
    assert "Idempotent-Replayed" not in again.headers


async def test_account_creation_replays(api: Api) -> None:
    body = {**identity("acct-retry@example.com"), "initial_balance_minor": 3}
    first = await api.post("/v1/billing/accounts", body, "admin", **{"Idempotency-Key": "acct-1"})
    again = await api.post("/v1/billing/accounts", body, "admin", **{"Idempotency-Key": "acct-1"})
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()


async def test_one_key_space_across_charges_and_other_requests(api: Api) -> None:
    # A charge's key lives on its charge row, any other request's in idempotency_keys: a key
    # taken in one place is a 409 in the other, in both directions, and nothing is charged.
    created = await api.post(
        "/v1/billing/accounts", identity("first@example.com"), **{"Idempotency-Key": "k-acct"}
    )
    assert created.status_code == 201
    charge = await api.post("/v1/billing/charges", CHARGE, **{"Idempotency-Key": "k-acct"})
    assert charge.status_code == 409
    assert charge.json()["detail"] == (
        "This Idempotency-Key was already used with a different request; "
        "use a new key for a new request"
    )
    await api.post("/v1/billing/charges", CHARGE, **{"Idempotency-Key": "k-charge"})
    account = await api.post(
        "/v1/billing/accounts", identity("second@example.com"), **{"Idempotency-Key": "k-charge"}
    )
    assert account.status_code == 409
    assert account.json()["detail"] == (
        "This Idempotency-Key was already used for a charge; use a new key"
    )
    replayed = await api.post(
        "/v1/billing/accounts", identity("first@example.com"), **{"Idempotency-Key": "k-acct"}
    )
    assert (replayed.status_code, replayed.headers["Idempotent-Replayed"]) == (201, "true")
    check = await api.post("/v1/billing/credits/check", identity("retry@example.com"))
    assert check.json()["total_uses"] == 1
    assert (await api.audit()).clean
