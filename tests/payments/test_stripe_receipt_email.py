"""Finding 12 (issue 12), the guide's own suite: `customer_email` never reached Stripe as
`receipt_email`, so Stripe sent no email receipt (the guide's checklist: "Configure Stripe email
receipts"). Proved against localstripe: the purchase is made through the service (Stripe
provider), then the PaymentIntent is read back from the Stripe-compatible server itself."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from ciris_billing import auth
from ciris_billing.app import create_app
from tests.support.api import identity, make_settings
from tests.support.localstripe import TEST_API_KEY, LocalStripe, run_localstripe

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(scope="module")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    with run_localstripe(tmp_path_factory.mktemp("localstripe-receipts")) as server:
        yield server


@pytest.fixture
async def stripe_service(
    database_url: str, localstripe: LocalStripe
) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    settings = make_settings(
        database_url,
        payment_provider="stripe",
        stripe_api_key=TEST_API_KEY,
        stripe_webhook_secret="whsec_receipts_test",
        stripe_publishable_key="pk_test_localstripe",
        stripe_api_base=localstripe.base_url,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with app.state.billing.engine.begin() as conn:
            _id, key = await auth.create_key(conn, "receipts", frozenset({"write"}))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://billing.test"
        ) as http:
            yield http, {"X-API-Key": key}


async def test_finding_12_customer_email_reaches_stripe_as_receipt_email(
    stripe_service: tuple[httpx.AsyncClient, dict[str, str]], localstripe: LocalStripe
) -> None:
    http, headers = stripe_service
    bought = await http.post(
        "/v1/billing/purchases",
        json={**identity("receipts@example.com"), "customer_email": "receipts@example.com"},
        headers=headers,
    )
    assert bought.status_code == 201, bought.text
    assert bought.json()["provider"] == "stripe"
    at_stripe = localstripe.retrieve(bought.json()["payment_id"])
    assert at_stripe.get("receipt_email") == "receipts@example.com"

    # No email given: none sent to Stripe (Stripe then uses the customer's, if any).
    anonymous = await http.post(
        "/v1/billing/purchases", json=identity("no-email@example.com"), headers=headers
    )
    assert anonymous.status_code == 201, anonymous.text
    assert localstripe.retrieve(anonymous.json()["payment_id"]).get("receipt_email") is None
