"""Rates (issue 24 item 3): charges by feature and quantity, `up` and `carry` rounding."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

from ciris_billing.db import accounts, audit_trail, charges, events
from tests.support.api import Api, identity, running_app

TOKENS = "gpt-4o-tokens"


async def set_rate(api: Api, feature: str, units: int, rounding: str) -> Any:
    answer = await api.post(
        "/v1/billing/rates",
        {"feature": feature, "units_per_use": units, "rounding": rounding},
        scope="admin",
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


async def paid_account(api: Api, user: dict[str, str], uses: int) -> None:
    answer = await api.post(
        "/v1/billing/accounts", {**user, "initial_balance_minor": uses}, scope="admin"
    )
    assert answer.status_code in (200, 201), answer.text


async def used(api: Api, user: dict[str, str]) -> int:
    check = (await api.post("/v1/billing/credits/check", user)).json()
    return int(check["total_uses"])


async def carried(api: Api, user: dict[str, str]) -> dict[str, int]:
    async with api.engine.connect() as conn:
        row = (
            await conn.execute(
                select(accounts.c.carry_features, accounts.c.carry_left).where(
                    accounts.c.external_id == user["external_id"]
                )
            )
        ).one()
    return dict(zip(row.carry_features, row.carry_left, strict=True))


async def test_the_guides_numbers_carry_takes_3_uses_up_takes_10(api: Api) -> None:
    await set_rate(api, TOKENS, 1000, "carry")
    await set_rate(api, "gpt-4o-tokens-up", 1000, "up")
    carry, up = identity("carry@example.com"), identity("up@example.com")
    await paid_account(api, carry, 20)
    await paid_account(api, up, 20)
    answers = []
    for _ in range(10):
        answer = await api.post(
            "/v1/billing/charges", {**carry, "feature": TOKENS, "quantity": 300}
        )
        assert answer.status_code == 201, answer.text
        answers.append(answer.json())
        answer = await api.post(
            "/v1/billing/charges", {**up, "feature": "gpt-4o-tokens-up", "quantity": 300}
        )
        assert answer.status_code == 201, answer.text
        assert answer.json()["uses"] == 1
    # 300, 600, 900 -> 0; 1200 -> 1 (200 kept); 500, 800 -> 0; 1100 -> 1 (100); 400, 700 -> 0;
    # 1000 -> 1 (0 kept).
    assert [a["uses"] for a in answers] == [0, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert {(a["feature"], a["quantity"]) for a in answers} == {(TOKENS, 300)}
    assert await used(api, carry) == 3
    assert await used(api, up) == 10
    assert await carried(api, carry) == {TOKENS: 0}
    async with api.engine.connect() as conn:
        rows = list(
            await conn.execute(
                select(charges.c.uses, charges.c.feature, charges.c.quantity).order_by(
                    charges.c.created_at
                )
            )
        )
    assert sum(r.uses for r in rows) == 13
    assert {(r.feature, r.quantity) for r in rows} == {(TOKENS, 300), ("gpt-4o-tokens-up", 300)}
    assert (await api.audit()).clean


async def test_100_concurrent_carry_charges_take_exactly_30_uses(api: Api) -> None:
    await set_rate(api, TOKENS, 1000, "carry")
    user = identity("busy@example.com")
    await paid_account(api, user, 50)
    body = {**user, "feature": TOKENS, "quantity": 300}
    responses = await asyncio.gather(*(api.post("/v1/billing/charges", body) for _ in range(100)))
    assert {r.status_code for r in responses} == {201}
    assert sum(r.json()["uses"] for r in responses) == 30
    assert await used(api, user) == 30
    assert await carried(api, user) == {TOKENS: 0}
    # One more of 300 and of 1,700 (in two features' slots), concurrently too.
    await set_rate(api, "images", 3, "carry")
    more = await asyncio.gather(
        api.post("/v1/billing/charges", {**user, "feature": TOKENS, "quantity": 1700}),
        api.post("/v1/billing/charges", {**user, "feature": "images", "quantity": 2}),
        api.post("/v1/billing/charges", {**user, "feature": "images", "quantity": 2}),
    )
    assert {r.status_code for r in more} == {201}
    assert await carried(api, user) == {TOKENS: 700, "images": 1}
    assert await used(api, user) == 32
    assert (await api.audit()).clean


async def test_carry_survives_a_restart(api: Api) -> None:
    """The remainder is on the account row: another app (a restarted process: new rate book,
    new connections) charges on from it."""
    await set_rate(api, TOKENS, 1000, "carry")
    user = identity("restart@example.com")
    await paid_account(api, user, 5)
    for _ in range(3):
        await api.post("/v1/billing/charges", {**user, "feature": TOKENS, "quantity": 300})
    assert await carried(api, user) == {TOKENS: 900}
    async with running_app(api.settings) as again:
        answer = await again.post(
            "/v1/billing/charges", {**user, "feature": TOKENS, "quantity": 300}
        )
        assert answer.json()["uses"] == 1
    assert await carried(api, user) == {TOKENS: 200}
    assert (await api.audit()).clean


async def test_refusals_are_422(api: Api) -> None:
    await set_rate(api, TOKENS, 1000, "carry")
    user = identity("refused@example.com")
    for body, expected in (
        ({"feature": "no-such-feature", "quantity": 5}, "unknown_feature"),
        ({"feature": TOKENS, "quantity": 5, "uses": 1}, None),
        ({"quantity": 5}, None),
        ({"feature": TOKENS}, None),
        ({"feature": TOKENS, "quantity": 0}, None),
        ({"feature": TOKENS, "quantity": -3}, None),
        ({"feature": "Bad Name", "quantity": 3}, None),
    ):
        answer = await api.post("/v1/billing/charges", {**user, **body})
        assert answer.status_code == 422, (body, answer.text)
        if expected:
            assert answer.json()["error"] == expected
    bad = await api.post(
        "/v1/billing/rates",
        {"feature": TOKENS, "units_per_use": 0, "rounding": "carry"},
        scope="admin",
    )
    assert bad.status_code == 422
    bad = await api.post(
        "/v1/billing/rates",
        {"feature": TOKENS, "units_per_use": 10, "rounding": "down"},
        scope="admin",
    )
    assert bad.status_code == 422
    assert (
        await api.post(
            "/v1/billing/rates", {"feature": TOKENS, "units_per_use": 1, "rounding": "up"}
        )
    ).status_code == 403
    assert (await api.audit()).clean


async def test_rates_list_update_and_audit_rows(api: Api) -> None:
    await set_rate(api, TOKENS, 1000, "carry")
    changed = await set_rate(api, TOKENS, 500, "up")
    assert (changed["units_per_use"], changed["rounding"]) == (500, "up")
    listed = (await api.get("/v1/billing/rates")).json()
    assert [(r["feature"], r["units_per_use"], r["rounding"]) for r in listed["rates"]] == [
        (TOKENS, 500, "up")
    ]
    async with api.engine.connect() as conn:
        rows = list(
            await conn.execute(
                select(audit_trail)
                .where(audit_trail.c.action == "set_rate")
                .order_by(audit_trail.c.created_at)
            )
        )
    assert [(r.subject, r.door, r.before, r.after["units_per_use"]) for r in rows] == [
        (TOKENS, "api", {}, 1000),
        (TOKENS, "api", {"feature": TOKENS, "units_per_use": 1000, "rounding": "carry"}, 500),
    ]
    # The change applies at once in this process: 1,200 tokens up at 500 -> 3 uses.
    user = identity("changed@example.com")
    await paid_account(api, user, 5)
    answer = await api.post("/v1/billing/charges", {**user, "feature": TOKENS, "quantity": 1200})
    assert answer.json()["uses"] == 3
    assert (await api.audit()).clean


async def test_a_carry_charge_beyond_the_balance_is_402_and_keeps_nothing(api: Api) -> None:
    await set_rate(api, TOKENS, 100, "carry")
    user = identity("poor@example.com")
    await api.post("/v1/billing/credits/check", user)  # 3 free uses
    answer = await api.post("/v1/billing/charges", {**user, "feature": TOKENS, "quantity": 350})
    assert answer.status_code == 201
    assert answer.json()["uses"] == 3
    assert await carried(api, user) == {TOKENS: 50}
    # 50 + 60 = 110: one use, none left.
    answer = await api.post("/v1/billing/charges", {**user, "feature": TOKENS, "quantity": 60})
    assert answer.status_code == 402, answer.text
    assert answer.json()["uses_requested"] == 1
    assert await carried(api, user) == {TOKENS: 50}
    # 50 + 40 = 90: no use, the remainder kept.
    answer = await api.post("/v1/billing/charges", {**user, "feature": TOKENS, "quantity": 40})
    assert answer.status_code == 201
    assert answer.json()["uses"] == 0
    assert answer.json()["lots"] == []
    assert await carried(api, user) == {TOKENS: 90}
    # The charge of 0 uses on the emptied account crossed nothing: balance.depleted once (the
    # 350's), not again.
    async with api.engine.connect() as conn:
        kinds = list((await conn.execute(select(events.c.type))).scalars())
    assert kinds.count("balance.depleted") == 1
    assert (await api.audit()).clean


async def test_the_portal_shows_usage_by_feature(api: Api) -> None:
    await set_rate(api, TOKENS, 1000, "carry")
    await set_rate(api, "images", 1, "up")
    user = identity("portal-rated@example.com")
    await paid_account(api, user, 20)
    for _ in range(4):
        await api.post("/v1/billing/charges", {**user, "feature": TOKENS, "quantity": 300})
    await api.post("/v1/billing/charges", {**user, "feature": "images", "quantity": 2})
    await api.post("/v1/billing/charges", user)  # a plain use: not in the table
    link = (await api.post("/v1/billing/credits/check", user)).json()["portal_url"]
    page = (await api.http.get(link)).text
    assert "Usage by feature" in page
    assert (
        '<td data-label="Feature">gpt-4o-tokens</td><td data-label="Quantity">1200</td>'
        '<td data-label="Uses">1</td><td data-label="Charges">4</td>'
    ) in page
    assert (
        '<td data-label="Feature">images</td><td data-label="Quantity">2</td>'
        '<td data-label="Uses">2</td><td data-label="Charges">1</td>'
    ) in page
    assert "(300 gpt-4o-tokens)" in page
    assert (await api.audit()).clean


async def test_holds_by_feature_up_and_carry(api: Api) -> None:
    await set_rate(api, "images-up", 4, "up")
    await set_rate(api, TOKENS, 1000, "carry")
    user = identity("held-rated@example.com")
    await paid_account(api, user, 10)
    held = await api.post(
        "/v1/billing/reservations", {**user, "feature": "images-up", "quantity": 9}
    )
    assert held.status_code == 201, held.text
    assert held.json()["uses"] == 3
    both = await api.post(
        "/v1/billing/reservations", {**user, "uses": 2, "feature": "images-up", "quantity": 9}
    )
    assert both.status_code == 422
    # A carry hold holds what its quantity can complete (900 tokens: 1 use whatever is carried).
    held = await api.post("/v1/billing/reservations", {**user, "feature": TOKENS, "quantity": 900})
    assert held.status_code == 201, held.text
    assert (held.json()["uses"], held.json()["feature"], held.json()["quantity"]) == (
        1,
        TOKENS,
        900,
    )
    capture = f"/v1/billing/reservations/{held.json()['reservation_id']}/capture"
    for wrong in ({"uses": 1}, {"quantity": 901}, {"uses": 1, "quantity": 3}):
        refused = await api.post(capture, wrong)
        assert refused.status_code == 422, (wrong, refused.text)
    # The interaction used 300: nothing completed, the use given back, 300 carried.
    made = await api.post(capture, {"quantity": 300})
    assert made.status_code == 201, made.text
    assert (made.json()["uses"], made.json()["released_uses"]) == (0, 1)
    assert (made.json()["feature"], made.json()["quantity"]) == (TOKENS, 300)
    assert await carried(api, user) == {TOKENS: 300}
    # All of a 900 hold captured (no quantity given): 300 + 900 completes one, 200 kept.
    held = await api.post("/v1/billing/reservations", {**user, "feature": TOKENS, "quantity": 900})
    made = await api.post(f"/v1/billing/reservations/{held.json()['reservation_id']}/capture", {})
    assert made.status_code == 201, made.text
    assert made.json()["uses"] == 1
    assert await carried(api, user) == {TOKENS: 200}
    # A hold of uses is not captured by quantity.
    plain = await api.post("/v1/billing/reservations", {**user, "uses": 1})
    refused = await api.post(
        f"/v1/billing/reservations/{plain.json()['reservation_id']}/capture", {"quantity": 1}
    )
    assert refused.status_code == 422, refused.text
    assert (await api.audit()).clean


async def test_carry_holds_and_charges_racing_carry_exactly(api: Api) -> None:
    await set_rate(api, TOKENS, 1000, "carry")
    user = identity("racing-holds@example.com")
    await paid_account(api, user, 40)
    body = {**user, "feature": TOKENS, "quantity": 300}
    holds = await asyncio.gather(*(api.post("/v1/billing/reservations", body) for _ in range(10)))
    assert {h.status_code for h in holds} == {201}
    captures = [
        api.post(f"/v1/billing/reservations/{h.json()['reservation_id']}/capture", {})
        for h in holds
    ]
    charges_ = [api.post("/v1/billing/charges", body) for _ in range(10)]
    answers = await asyncio.gather(*captures, *charges_)
    assert {a.status_code for a in answers} == {201}
    # 20 x 300 = 6,000 tokens: exactly 6 uses, nothing carried.
    assert sum(a.json()["uses"] for a in answers) == 6
    assert await used(api, user) == 6
    assert await carried(api, user) == {TOKENS: 0}
    assert (await api.audit()).clean
