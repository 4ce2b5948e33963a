"""Issue 26 item 3: a charge answers what the next credit check would say (`next_check`), so an
agent's check-then-charge loop needs the check only once. Each case: charge, then check, and
the two agree (but the portal link, made anew per answer)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.support.api import Api, identity

CHARGES, CHECK = "/v1/billing/charges", "/v1/billing/credits/check"
RESERVE = "/v1/billing/reservations"
PREFER = {"Prefer": "next-check"}


def without_link(answer: dict[str, Any]) -> dict[str, Any]:
    assert answer["portal_url"].startswith("http")
    return {k: v for k, v in answer.items() if k != "portal_url"}


async def charge_then_check(api: Api, user: dict[str, str], **body: Any) -> dict[str, Any]:
    charged = await api.post(CHARGES, {**user, **body}, **PREFER)
    assert charged.status_code == 201, charged.text
    assert charged.headers["Preference-Applied"] == "next-check"
    checked = await api.post(CHECK, user, "write")
    assert checked.status_code == 200, checked.text
    assert without_link(charged.json()["next_check"]) == without_link(checked.json())
    return dict(charged.json()["next_check"])


async def test_a_charge_answers_the_next_check(api: Api) -> None:
    user = identity("next-check@example.com")
    await api.post(CHECK, user)  # 3 free uses
    after = await charge_then_check(api, user)
    assert (after["has_credit"], after["free_uses_remaining"], after["total_uses"]) == (True, 2, 1)
    # With a hold open: its uses are held, not available.
    held = await api.post(RESERVE, {**user, "uses": 1})
    assert held.status_code == 201, held.text
    after = await charge_then_check(api, user)
    assert (after["held_uses"], after["free_uses_remaining"]) == (1, 0)
    # The charge that empties it: the next check says buy (the default pack's price and uses).
    await api.post(f"{RESERVE}/{held.json()['reservation_id']}/release", {})
    after = await charge_then_check(api, user)
    assert after["purchase_required"] is True
    assert after["has_credit"] is False
    assert after["purchase_price_minor"] > 0
    assert after["purchase_uses"] > 0
    assert (await api.audit()).clean


async def test_an_expiring_lot_is_in_the_next_check(api: Api) -> None:
    user = identity("next-check-expiring@example.com")
    await api.post(CHECK, user)
    later = (datetime.now(UTC) + timedelta(days=3)).replace(microsecond=0).isoformat()
    granted = await api.post(
        "/v1/billing/credits",
        {**user, "uses": 5, "reason": "goodwill", "expires_at": later, "priority": 10},
        "admin",
    )
    assert granted.status_code in (200, 201), granted.text
    after = await charge_then_check(api, user, uses=2)
    assert after["next_expiry"]["uses"] == 3
    # A rated charge too (a `carry` one completing no use answers it as well).
    rate = {"feature": "tokens", "units_per_use": 1000, "rounding": "carry"}
    assert (await api.post("/v1/billing/rates", rate, "admin")).status_code == 200
    after = await charge_then_check(api, user, feature="tokens", quantity=300)
    assert after["total_uses"] == 2
    assert (await api.audit()).clean


async def test_batched_charges_answer_it_too(api: Api) -> None:
    users = [identity(f"next-check-{n}@example.com") for n in range(20)]
    for user in users:
        await api.post(CHECK, user)
    answers = await asyncio.gather(*(api.post(CHARGES, user, **PREFER) for user in users))
    assert {a.status_code for a in answers} == {201}
    for user, answer in zip(users, answers, strict=True):
        checked = (await api.post(CHECK, user, "write")).json()
        assert without_link(answer.json()["next_check"]) == without_link(checked)


async def test_only_when_asked_and_never_on_a_replay(api: Api) -> None:
    user = identity("next-check-replay@example.com")
    plain = await api.post(CHARGES, user)
    assert "next_check" not in plain.json()
    assert "Preference-Applied" not in plain.headers
    first = await api.post(CHARGES, user, **{"Idempotency-Key": "nc-1"}, **PREFER)
    again = await api.post(CHARGES, user, **{"Idempotency-Key": "nc-1"}, **PREFER)
    assert first.status_code == again.status_code == 201
    assert "next_check" in first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "next_check" not in again.json()
    assert again.json() == {k: v for k, v in first.json().items() if k != "next_check"}
