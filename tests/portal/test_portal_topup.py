"""Auto top-up in the customer portal: shown with the saved card's brand and last 4, switched
on and off, and the saved card removed after a confirmation, all through the auto top-up
service (autotopup.cards, as the API and the CLI); the API then says the same."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.support.api import Api, identity
from tests.support.flows import check

WHO = identity("portal-topup@example.com")
CARD = "4242424242424242"


async def bought_saving_card(api: Api) -> None:
    """The payment page with its auto top-up box ticked, then the card."""
    bought: dict[str, Any] = (await api.post("/v1/billing/purchases", WHO)).json()
    paid = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{bought['payment_id']}/confirm",
        json={"client_secret": bought["client_secret"], "card_number": CARD, "save_card": True},
    )
    assert paid.status_code == 200, paid.text


async def portal(api: Api) -> str:
    return httpx.URL((await check(api, WHO))["portal_url"]).path


async def api_says(api: Api) -> dict[str, Any]:
    shown = await api.get(
        f"/v1/billing/accounts/{WHO['oauth_provider']}/{WHO['external_id']}/auto_topup"
    )
    body: dict[str, Any] = shown.json()
    return body


def state_of(html: str) -> str:
    found = re.search(r'id="auto-topup-state">(on|off)<', html)
    assert found is not None
    return found.group(1)


async def test_switch_auto_topup_off_and_on(api: Api) -> None:
    await bought_saving_card(api)
    path = await portal(api)
    page = await api.http.get(path)
    assert 'id="saved-card">Visa ending in 4242<' in page.text
    assert state_of(page.text) == "on"
    off = await api.http.post(f"{path}/auto-topup", data={"auto_topup": "off"})
    assert off.status_code == 303
    assert off.headers["location"] == f"{path}?notice=topup_off#auto-topup"
    page = await api.http.get(off.headers["location"])
    assert state_of(page.text) == "off"
    assert "Auto top-up is off." in page.text
    assert (await api_says(api))["enabled"] is False
    on = await api.http.post(f"{path}/auto-topup", data={"auto_topup": "on"})
    assert on.status_code == 303
    assert state_of((await api.http.get(path)).text) == "on"
    assert (await api_says(api))["enabled"] is True


async def test_remove_the_saved_card_after_confirming(api: Api) -> None:
    await bought_saving_card(api)
    path = await portal(api)
    asked = await api.http.post(f"{path}/card", data={})
    assert asked.status_code == 200
    assert "Remove your saved card?" in asked.text
    assert "Visa ending in 4242" in asked.text
    assert (await api_says(api))["card_saved"] is True  # nothing before the confirmation
    removed = await api.http.post(f"{path}/card", data={"confirm": "yes"})
    assert removed.status_code == 303
    page = await api.http.get(removed.headers["location"])
    assert "Your saved card was removed; auto top-up is off." in page.text
    assert "No saved card." in page.text
    assert state_of(page.text) == "off"
    body = await api_says(api)
    assert (body["card_saved"], body["enabled"], body["card_last4"]) == (False, False, None)
    # Without a card it cannot be switched on: the service's own refusal, shown.
    refused = await api.http.post(f"{path}/auto-topup", data={"auto_topup": "on"})
    assert refused.status_code == 409
    assert "No saved card" in refused.text


async def test_without_a_card_the_portal_says_how(api: Api) -> None:
    path = await portal(api)
    page = await api.http.get(path)
    assert "No saved card." in page.text
    assert 'action="' + path + '/auto-topup"' not in page.text


async def test_a_tampered_link_changes_nothing(api: Api) -> None:
    await bought_saving_card(api)
    path = await portal(api)
    tampered = path[:-4] + ("0000" if not path.endswith("0000") else "1111")
    for url, data in (
        (f"{tampered}/auto-topup", {"auto_topup": "off"}),
        (f"{tampered}/card", {"confirm": "yes"}),
    ):
        assert (await api.http.post(url, data=data)).status_code == 404
    assert (await api_says(api))["enabled"] is True
    bad = await api.http.post(f"{path}/auto-topup", data={"auto_topup": "maybe"})
    assert bad.status_code == 422
