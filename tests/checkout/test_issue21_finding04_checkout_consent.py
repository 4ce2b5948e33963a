"""Issue 21, finding 4: "A checkout link's holder can save the payer's card on their own account".

The attack: the attacker opens their own buy link, sends `POST /checkout/{id}/auto_topup
{"enabled": true}`, and passes the payment page on; the page came up with the box ticked and
named no account, the victim paid, and the victim's card became the attacker's top-up card.
Now there is no state to set beforehand: the payer's consent travels with the confirmation
itself (the sandbox's `save_card`, Stripe's `setup_future_usage` sent by Stripe.js), and the
page's summary names the account (masked) and what auto top-up would charge.
"""

from __future__ import annotations

import uuid
from typing import Any

from tests.support.api import Api, identity
from tests.support.flows import VISA

ATTACKER = f"mallory-{uuid.uuid4().hex[:6]}@example.com"


async def _buy(api: Api, email: str) -> dict[str, Any]:
    bought = await api.post("/v1/billing/purchases", identity(email))
    assert bought.status_code == 201, bought.text
    body: dict[str, Any] = bought.json()
    return body


async def _topup(api: Api, email: str) -> dict[str, Any]:
    shown = await api.get(f"/v1/billing/accounts/oauth:google/{email}/auto_topup")
    assert shown.status_code == 200, shown.text
    body: dict[str, Any] = shown.json()
    return body


async def test_issue21_finding04_a_link_holder_cannot_consent_for_the_payer(api: Api) -> None:
    bought = await _buy(api, ATTACKER)
    payment_id, secret = bought["payment_id"], bought["client_secret"]
    # What the link's holder tries before passing the page on: nothing to set any more.
    preset = await api.http.post(
        f"/v1/billing/checkout/{payment_id}/auto_topup",
        json={"enabled": True},
        headers={"X-Client-Secret": secret},
    )
    assert preset.status_code in (404, 405), preset.text

    summary = await api.http.get(
        f"/v1/billing/checkout/{payment_id}/summary", headers={"X-Client-Secret": secret}
    )
    assert summary.status_code == 200, summary.text
    shown = summary.json()
    assert "save_card" not in shown
    assert shown["account_label"] == f"{ATTACKER[0]}•••@example.com (google)"
    assert ATTACKER not in summary.text
    assert shown["auto_topup"] == {
        "uses": 20,
        "amount_minor": 500,
        "price": "$5.00",
        "threshold_uses": 3,
        "max_per_month": 10,
    }

    # The victim pays without ticking the box: no card is kept on the attacker's account.
    paid = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
        json={"client_secret": secret, "card_number": VISA},
    )
    assert paid.status_code == 200, paid.text
    topup = await _topup(api, ATTACKER)
    assert (topup["enabled"], topup["card_saved"]) == (False, False)
    assert (await api.audit()).clean


async def test_issue21_finding04_the_payers_tick_goes_with_the_confirmation(api: Api) -> None:
    payer = f"payer-{uuid.uuid4().hex[:6]}@example.com"
    bought = await _buy(api, payer)
    paid = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{bought['payment_id']}/confirm",
        json={"client_secret": bought["client_secret"], "card_number": VISA, "save_card": True},
    )
    assert paid.status_code == 200, paid.text
    topup = await _topup(api, payer)
    assert (topup["enabled"], topup["card_last4"]) == (True, "4242")
    assert (await api.audit()).clean
