"""What a receipt shows of the card that paid: its brand and last 4, as the provider reports
them (never the number). The sandbox keeps them when its card form is paid (Stripe test mode's
behaviour); the Stripe provider reads them from the PaymentIntent's expanded latest charge
(`payment_method_details.card`, Stripe's documented shape: localstripe does not send it)."""

from __future__ import annotations

from typing import Any

import pytest
import stripe

from ciris_billing.payments.providers.sandbox import card_brand
from ciris_billing.payments.providers.stripe import _result
from tests.support.api import Api
from tests.support.flows import VISA, pay, purchase


def intent(latest_charge: Any) -> stripe.PaymentIntent:
    return stripe.PaymentIntent.construct_from(
        {
            "id": "pi_receipt",
            "object": "payment_intent",
            "status": "succeeded",
            "amount": 500,
            "currency": "usd",
            "client_secret": "pi_receipt_secret_x",
            "metadata": {},
            "last_payment_error": None,
            "payment_method": None,
            "customer": None,
            "setup_future_usage": None,
            "latest_charge": latest_charge,
        },
        "sk_test_receipt",
    )


def test_stripe_reports_the_card_of_the_latest_charge() -> None:
    paid = _result(
        intent(
            {
                "id": "ch_receipt",
                "object": "charge",
                "amount_refunded": 0,
                "payment_method_details": {
                    "type": "card",
                    "card": {"brand": "mastercard", "last4": "4444", "exp_year": 2030},
                },
            }
        )
    )
    assert (paid.card_brand, paid.card_last4) == ("mastercard", "4444")


@pytest.mark.parametrize(
    "latest_charge",
    [None, "ch_not_expanded", {"id": "ch_x", "object": "charge", "amount_refunded": 0}],
)
def test_stripe_without_a_card_reports_none(latest_charge: Any) -> None:
    paid = _result(intent(latest_charge))
    assert (paid.card_brand, paid.card_last4) == (None, None)


@pytest.mark.parametrize(
    ("number", "brand"),
    [
        ("4242424242424242", "visa"),
        ("5555555555554444", "mastercard"),
        ("2223003122003222", "mastercard"),
        ("378282246310005", "amex"),
        ("3056930009020004", "unknown"),
    ],
)
def test_the_sandbox_names_brands_as_stripe_does(number: str, brand: str) -> None:
    assert card_brand(number) == brand


async def test_the_sandbox_reports_the_card_that_paid(api: Api) -> None:
    bought = await purchase(api)
    before = await api.state.provider.get_payment(bought["payment_id"])
    assert before is not None
    assert (before.card_brand, before.card_last4) == (None, None)
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    after = await api.state.provider.get_payment(bought["payment_id"])
    assert after is not None
    assert (after.card_brand, after.card_last4) == ("visa", "4242")
