"""StripeProvider against a real localstripe on 127.0.0.1 (the official SDK, over HTTP)."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ciris_billing.errors import InvalidWebhookSignature, ProviderError, ProviderUnavailable
from ciris_billing.payments.providers import signing
from ciris_billing.payments.providers.base import (
    ACCOUNT_ID_KEY,
    PURCHASE_ID_KEY,
    PaymentEvent,
    PaymentIntent,
    PaymentResult,
)
from ciris_billing.payments.providers.stripe import StripeProvider
from tests.support.localstripe import (
    CARD_DECLINED_AT_CHARGE,
    CARD_REQUIRES_3DS,
    TEST_API_KEY,
    LocalStripe,
    run_localstripe,
)

WEBHOOK_SECRET = "whsec_test_provider_secret"

# stripe 16.1.0's HTTPXClient hands its form-encoded body to httpx as `data=<str>`, which
# httpx 0.28 deprecates (it still sends it correctly).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture(scope="module")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    with run_localstripe(tmp_path_factory.mktemp("localstripe")) as server:
        yield server


@pytest.fixture
async def provider(localstripe: LocalStripe) -> AsyncIterator[StripeProvider]:
    stripe_provider = StripeProvider(
        TEST_API_KEY,
        WEBHOOK_SECRET,
        "pk_test_localstripe",
        api_base=localstripe.base_url,
        max_network_retries=0,
    )
    yield stripe_provider
    await stripe_provider.aclose()


def an_intent(amount_minor: int = 500, currency: str = "USD") -> PaymentIntent:
    purchase_id = f"pur_{uuid.uuid4().hex}"
    return PaymentIntent(
        amount_minor=amount_minor,
        currency=currency,
        purchase_id=purchase_id,
        account_id=f"acc_{uuid.uuid4().hex}",
        idempotency_key=f"purchase-{purchase_id}",
        customer_email="buyer@example.com",
    )


async def settled(provider: StripeProvider, payment_id: str) -> PaymentResult:
    """The payment once it has left `processing` (cards settle at once in localstripe)."""
    deadline = time.monotonic() + 5
    while True:
        payment = await provider.get_payment(payment_id)
        assert payment is not None
        if payment.state != "processing" or time.monotonic() > deadline:
            return payment
        await asyncio.sleep(0.05)


# --- PaymentIntents ---------------------------------------------------------------------------


async def test_create_payment_intent(provider: StripeProvider) -> None:
    intent = an_intent(amount_minor=500, currency="USD")
    created = await provider.create_payment_intent(intent)

    assert created.payment_id.startswith("pi_")
    assert (created.state, created.provider_status) == ("pending", "requires_payment_method")
    assert created.amount_minor == 500
    assert created.currency == "USD"
    assert created.client_secret is not None
    assert created.client_secret.startswith(f"{created.payment_id}_secret_")
    assert created.metadata == {
        PURCHASE_ID_KEY: intent.purchase_id,
        ACCOUNT_ID_KEY: intent.account_id,
    }
    assert created.failure_message is None
    assert created.amount_refunded_minor == 0
    assert provider.name == "stripe"
    assert provider.publishable_key == "pk_test_localstripe"

    fetched = await provider.get_payment(created.payment_id)
    assert fetched is not None
    assert (fetched.state, fetched.amount_minor, fetched.currency, fetched.metadata) == (
        "pending",
        500,
        "USD",
        created.metadata,
    )
    assert await provider.confirm_payment(created.payment_id) is False


async def test_paid_with_visa_succeeds(provider: StripeProvider, localstripe: LocalStripe) -> None:
    created = await provider.create_payment_intent(an_intent())

    assert localstripe.pay(created.payment_id)["status"] == "succeeded"

    payment = await settled(provider, created.payment_id)
    assert (payment.state, payment.provider_status) == ("succeeded", "succeeded")
    assert payment.amount_minor == 500
    assert payment.failure_message is None
    assert await provider.confirm_payment(created.payment_id) is True


async def test_declined_card(provider: StripeProvider, localstripe: LocalStripe) -> None:
    created = await provider.create_payment_intent(an_intent())
    card = localstripe.create_card_payment_method(CARD_DECLINED_AT_CHARGE)

    assert localstripe.pay(created.payment_id, card)["status"] == "requires_payment_method"

    payment = await provider.get_payment(created.payment_id)
    assert payment is not None
    assert (payment.state, payment.provider_status) == ("failed", "requires_payment_method")
    assert payment.failure_message == "Your card was declined."
    assert await provider.confirm_payment(created.payment_id) is False


async def test_3ds_card_requires_action_then_succeeds(
    provider: StripeProvider, localstripe: LocalStripe
) -> None:
    created = await provider.create_payment_intent(an_intent())
    assert created.client_secret is not None
    card = localstripe.create_card_payment_method(CARD_REQUIRES_3DS)

    assert localstripe.pay(created.payment_id, card)["status"] == "requires_action"
    payment = await provider.get_payment(created.payment_id)
    assert payment is not None
    assert (payment.state, payment.provider_status) == ("requires_action", "requires_action")
    assert await provider.confirm_payment(created.payment_id) is False

    authenticated = localstripe.authenticate(created.payment_id, created.client_secret)
    assert authenticated["status"] == "succeeded"
    assert (await settled(provider, created.payment_id)).state == "succeeded"
    assert await provider.confirm_payment(created.payment_id) is True


async def test_3ds_authentication_failed(
    provider: StripeProvider, localstripe: LocalStripe
) -> None:
    created = await provider.create_payment_intent(an_intent())
    assert created.client_secret is not None
    card = localstripe.create_card_payment_method(CARD_REQUIRES_3DS)
    localstripe.pay(created.payment_id, card)

    localstripe.authenticate(created.payment_id, created.client_secret, success=False)

    payment = await provider.get_payment(created.payment_id)
    assert payment is not None
    assert (payment.state, payment.provider_status) == ("failed", "requires_payment_method")
    assert payment.failure_message is not None
    assert await provider.confirm_payment(created.payment_id) is False


async def test_unknown_payment_is_none(provider: StripeProvider) -> None:
    assert await provider.get_payment("pi_doesnotexist00000") is None
    assert await provider.confirm_payment("pi_doesnotexist00000") is False


# --- refunds ----------------------------------------------------------------------------------


async def test_refunds(provider: StripeProvider, localstripe: LocalStripe) -> None:
    created = await provider.create_payment_intent(an_intent(amount_minor=500))
    localstripe.pay(created.payment_id)

    partial = await provider.refund_payment(created.payment_id, 100)
    assert partial.startswith("re_")
    payment = await provider.get_payment(created.payment_id)
    assert payment is not None
    assert payment.amount_refunded_minor == 100

    rest = await provider.refund_payment(created.payment_id, None)
    assert rest.startswith("re_")
    assert rest != partial


async def test_refunding_a_failed_payment_is_a_provider_error(
    provider: StripeProvider, localstripe: LocalStripe
) -> None:
    created = await provider.create_payment_intent(an_intent())
    localstripe.pay(
        created.payment_id, localstripe.create_card_payment_method(CARD_DECLINED_AT_CHARGE)
    )

    with pytest.raises(ProviderError) as caught:
        await provider.refund_payment(created.payment_id, None)

    assert caught.value.status_code == 502
    assert "http_status=400" in caught.value.detail
    assert TEST_API_KEY not in str(caught.value.body())
    assert created.client_secret is not None
    assert created.client_secret not in str(caught.value.body())


# --- errors -----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_unreachable_stripe_is_unavailable() -> None:
    unreachable = StripeProvider(
        TEST_API_KEY,
        WEBHOOK_SECRET,
        None,
        api_base=f"http://127.0.0.1:{_closed_port()}",
        max_network_retries=0,
        timeout_seconds=2,
    )
    try:
        started = time.monotonic()
        with pytest.raises(ProviderUnavailable) as caught:
            await unreachable.create_payment_intent(an_intent())
        assert time.monotonic() - started < 3
        assert caught.value.status_code == 503
        assert TEST_API_KEY not in str(caught.value.body())

        # Unreachable is not "unknown": reconciliation must not take it for a missing payment.
        with pytest.raises(ProviderUnavailable):
            await unreachable.get_payment("pi_whatever")
        with pytest.raises(ProviderUnavailable):
            await unreachable.refund_payment("pi_whatever", None)
    finally:
        await unreachable.aclose()


async def test_secrets_stay_out_of_repr() -> None:
    stripe_provider = StripeProvider(TEST_API_KEY, WEBHOOK_SECRET, "pk_test_x")
    try:
        assert TEST_API_KEY not in repr(stripe_provider)
        assert WEBHOOK_SECRET not in repr(stripe_provider)
    finally:
        await stripe_provider.aclose()


def test_a_webhook_secret_is_required() -> None:
    with pytest.raises(ValueError, match="webhook secret"):
        StripeProvider(TEST_API_KEY, "", None)


# --- webhooks ---------------------------------------------------------------------------------


def an_event(data_object: dict[str, Any], event_type: str = "payment_intent.succeeded") -> bytes:
    event = {
        "id": f"evt_{uuid.uuid4().hex[:14]}",
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "livemode": False,
        "api_version": "2017-08-15",
        "data": {"object": data_object},
    }
    return json.dumps(event, indent=2, sort_keys=True).encode()


PAYMENT_INTENT_OBJECT = {"id": "pi_test123", "object": "payment_intent", "amount": 500}


async def test_verify_webhook_accepts_a_signed_event(provider: StripeProvider) -> None:
    payload = an_event(PAYMENT_INTENT_OBJECT)

    event = await provider.verify_webhook(payload, signing.sign(payload, WEBHOOK_SECRET))

    parsed = json.loads(payload)
    assert event.event_id == parsed["id"]
    assert event.type == "payment_intent.succeeded"
    assert event.payment_id == "pi_test123"
    assert event.subject == PaymentEvent("pi_test123")
    assert event.created == parsed["created"]
    assert event.payload == parsed


@pytest.mark.parametrize(
    ("data_object", "payment_id"),
    [
        ({"id": "ch_1", "object": "charge", "payment_intent": "pi_from_charge"}, "pi_from_charge"),
        ({"id": "re_1", "object": "refund", "payment_intent": "pi_from_refund"}, "pi_from_refund"),
        ({"id": "dp_1", "object": "dispute", "payment_intent": None}, None),
        ({"id": "cus_1", "object": "customer"}, None),
    ],
)
async def test_webhook_payment_id_of_other_objects(
    provider: StripeProvider, data_object: dict[str, Any], payment_id: str | None
) -> None:
    payload = an_event(data_object, event_type=f"{data_object['object']}.updated")
    event = await provider.verify_webhook(payload, signing.sign(payload, WEBHOOK_SECRET))
    assert event.payment_id == payment_id


def _header_for(payload: bytes) -> str:
    return signing.sign(payload, WEBHOOK_SECRET)


@pytest.mark.parametrize(
    "case", ["wrong_secret", "stale", "tampered", "missing", "garbage", "no_v1"]
)
async def test_verify_webhook_rejects(provider: StripeProvider, case: str) -> None:
    payload = an_event(PAYMENT_INTENT_OBJECT)
    body, header = payload, _header_for(payload)
    if case == "wrong_secret":
        header = signing.sign(payload, "whsec_someone_else")
    elif case == "stale":
        header = signing.sign(payload, WEBHOOK_SECRET, timestamp=int(time.time()) - 301)
    elif case == "tampered":
        body = payload.replace(b'"amount": 500', b'"amount": 5')
        assert body != payload
    elif case == "missing":
        header = ""
    elif case == "garbage":
        header = "t=notanumber,v1=zz"
    elif case == "no_v1":
        header = header.replace("v1=", "v0=")

    with pytest.raises(InvalidWebhookSignature) as caught:
        await provider.verify_webhook(body, header)

    assert caught.value.status_code == 400
    assert WEBHOOK_SECRET not in str(caught.value.body())


async def test_verify_webhook_rejects_a_signed_body_that_is_no_event(
    provider: StripeProvider,
) -> None:
    for payload in (b"not json", b"[]", b'{"id": "evt_1"}'):
        with pytest.raises(InvalidWebhookSignature):
            await provider.verify_webhook(payload, signing.sign(payload, WEBHOOK_SECRET))


class _Receiver(BaseHTTPRequestHandler):
    deliveries: queue.Queue[tuple[bytes, str]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.deliveries.put((body, self.headers.get("Stripe-Signature", "")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


async def test_webhook_delivered_by_localstripe_verifies(
    provider: StripeProvider, localstripe: LocalStripe
) -> None:
    deliveries: queue.Queue[tuple[bytes, str]] = queue.Queue()
    handler = type("Receiver", (_Receiver,), {"deliveries": deliveries})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/billing/webhooks/stripe"
        localstripe.register_webhook(
            url, WEBHOOK_SECRET, events=["payment_intent.succeeded"], webhook_id="wh_provider"
        )
        created = await provider.create_payment_intent(an_intent())
        localstripe.pay(created.payment_id)

        deadline = time.monotonic() + 10
        while True:
            wait = max(0.1, deadline - time.monotonic())
            body, header = await asyncio.to_thread(deliveries.get, timeout=wait)
            event = await provider.verify_webhook(body, header)
            if event.payment_id == created.payment_id or time.monotonic() > deadline:
                break
        assert event.type == "payment_intent.succeeded"
        assert event.payment_id == created.payment_id
        assert event.event_id.startswith("evt_")
        assert event.payload["data"]["object"]["metadata"] == created.metadata
    finally:
        # An empty event list: later tests deliver nothing here.
        localstripe.register_webhook(url, WEBHOOK_SECRET, events=[], webhook_id="wh_provider")
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
