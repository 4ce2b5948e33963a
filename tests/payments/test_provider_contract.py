"""The provider conformance suite: one contract, run against every payment provider.

Each test takes a `Harness` (the provider under test plus the customer's, the bank's and the
dashboard's side of it) and checks what the business layer relies on: create, confirm,
decline, 3-D Secure, signed webhooks verified and forged ones refused, refunds full and
partial, disputes, get_payment and reconcile, through our own service and webhook inbox on
PostgreSQL. A new provider is done when it passes this file (docs/adding-a-provider.md).

Providers: the sandbox, and Stripe against localstripe. localstripe never emits refund or
dispute events and has no disputes API, so for Stripe those events are built and signed here
with the webhook secret, exactly as Stripe would send them; everything else is localstripe's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Protocol

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.accounts.service import Identity, ensure_account
from ciris_billing.db import accounts, create_engine, metadata, purchases, webhook_events
from ciris_billing.errors import CardDeclined, InvalidWebhookSignature, ProviderError
from ciris_billing.payments import service
from ciris_billing.payments.providers import sandbox as sandbox_module
from ciris_billing.payments.providers import signing
from ciris_billing.payments.providers.base import (
    DisputeEvent,
    OffSessionPayment,
    PaymentEvent,
    PaymentProvider,
    PaymentResult,
    RefundEvent,
    SavedCard,
)
from ciris_billing.payments.providers.sandbox import SandboxProvider
from ciris_billing.payments.providers.stripe import StripeProvider
from ciris_billing.pricing import Pricing
from ciris_billing.unit_of_work import unit_of_work
from ciris_billing.webhooks import inbox
from tests.support.localstripe import TEST_API_KEY, LocalStripe, run_localstripe

# stripe 16.1.0's HTTPXClient hands its form-encoded body to httpx as `data=<str>`, which
# httpx 0.28 deprecates (it still sends it correctly).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

WEBHOOK_SECRET = "whsec_contract_secret"
# Test cards both providers know (the guide's, and localstripe's PaymentMethod table).
CARD_SUCCEEDS = "4242424242424242"
CARD_DECLINED = "4000000000000341"  # localstripe declines this one, not ...9995
CARD_NEEDS_3DS = "4000002500003155"
# Saved, then charged off-session: asks for authentication every time (both know it).
CARD_ALWAYS_3DS = "4000002760003184"
PRICING = Pricing(
    free_uses_per_account=3, paid_uses_per_purchase=20, price_per_purchase_minor=500, currency="USD"
)
EVENT_WAIT_SECONDS = 15.0
Signed = tuple[bytes, str]  # a webhook body and its signature header


class Harness(Protocol):
    """A provider under test, and the other parties a test needs to play."""

    @property
    def provider(self) -> PaymentProvider: ...

    async def pay(self, payment: PaymentResult, card: str, save_card: bool = False) -> None:
        """The customer confirms the payment with a test card (a decline is not an error);
        `save_card`: with their consent to keep the card (setup_future_usage)."""
        ...

    async def authenticate(self, payment: PaymentResult, success: bool) -> None:
        """The customer completes (or fails) 3-D Secure on a payment that requires action."""
        ...

    async def payment_webhook(self, payment_id: str) -> Signed:
        """The provider's own signed delivery saying the payment succeeded."""
        ...

    async def refund_webhook(self, payment_id: str) -> Signed:
        """A signed event announcing the latest refund of the payment."""
        ...

    async def dispute_webhook(
        self, payment_id: str, outcome: Literal["open", "won", "lost"]
    ) -> Signed:
        """The bank opens a chargeback on the payment, or closes it: its signed event."""
        ...

    async def card_now_behaves_as(self, card: SavedCard, number: str) -> None:
        """The bank's side: a saved card now does what test card `number` does when charged
        (it starts being declined, or asking for authentication)."""
        ...


# --- the sandbox --------------------------------------------------------------------------------


@dataclass
class SandboxHarness:
    provider: SandboxProvider
    delivered: list[Signed] = field(default_factory=list)

    async def pay(self, payment: PaymentResult, card: str, save_card: bool = False) -> None:
        assert payment.client_secret is not None
        # A decline is the payment's new state (the test reads it from get_payment), not an error.
        with contextlib.suppress(CardDeclined):
            await self.provider.confirm_with_card(
                payment.payment_id, payment.client_secret, card, save_card
            )

    async def authenticate(self, payment: PaymentResult, success: bool) -> None:
        assert payment.client_secret is not None
        await self.provider.authenticate(payment.payment_id, payment.client_secret, success)

    def _last(self, payment_id: str, kind: type[Any]) -> Signed:
        for payload, header in reversed(self.delivered):
            event = self.provider.parse_event(payload)
            if isinstance(event.subject, kind) and _names(event.subject, payment_id):
                return payload, header
        raise AssertionError(f"the sandbox delivered no {kind.__name__} for {payment_id}")

    async def payment_webhook(self, payment_id: str) -> Signed:
        return self._last(payment_id, PaymentEvent)

    async def refund_webhook(self, payment_id: str) -> Signed:
        return self._last(payment_id, RefundEvent)

    async def dispute_webhook(
        self, payment_id: str, outcome: Literal["open", "won", "lost"]
    ) -> Signed:
        await self.provider.dispute(payment_id, "needs_response" if outcome == "open" else outcome)
        return self._last(payment_id, DisputeEvent)

    async def card_now_behaves_as(self, card: SavedCard, number: str) -> None:
        behaviour = sandbox_module.off_session_behaviour(number)
        await self.provider.set_card_behaviour(card.payment_method_id, behaviour)


def _names(subject: Any, payment_id: str) -> bool:
    """The sandbox's dispute events name a charge, `ch_` + the payment id's tail."""
    if isinstance(subject, DisputeEvent) and subject.payment_id is None:
        return subject.charge_id == "ch_" + payment_id.removeprefix("pi_")
    return bool(subject.payment_id == payment_id)


# --- Stripe on localstripe ----------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    deliveries: queue.Queue[Signed]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.deliveries.put((body, self.headers.get("Stripe-Signature", "")))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no access log in the test output


@dataclass
class StripeBackend:
    """localstripe, delivering every event to a receiver on 127.0.0.1 that queues it."""

    localstripe: LocalStripe
    deliveries: queue.Queue[Signed]
    seen: list[Signed] = field(default_factory=list)


@pytest.fixture(scope="module")
def stripe_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StripeBackend]:
    deliveries: queue.Queue[Signed] = queue.Queue()
    handler = type("Receiver", (_Receiver,), {"deliveries": deliveries})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with run_localstripe(tmp_path_factory.mktemp("localstripe")) as localstripe:
            url = f"http://127.0.0.1:{server.server_address[1]}/v1/billing/webhooks/stripe"
            localstripe.register_webhook(url, WEBHOOK_SECRET)
            yield StripeBackend(localstripe, deliveries)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass
class StripeHarness:
    provider: StripeProvider
    backend: StripeBackend

    async def pay(self, payment: PaymentResult, card: str, save_card: bool = False) -> None:
        server = self.backend.localstripe
        method = await asyncio.to_thread(server.create_card_payment_method, card)
        await asyncio.to_thread(server.pay, payment.payment_id, method, save_card)

    async def authenticate(self, payment: PaymentResult, success: bool) -> None:
        assert payment.client_secret is not None
        await asyncio.to_thread(
            self.backend.localstripe.authenticate,
            payment.payment_id,
            payment.client_secret,
            success,
        )

    async def payment_webhook(self, payment_id: str) -> Signed:
        """localstripe's own delivery (~1 s after the payment), signed with the secret."""
        deadline = time.monotonic() + EVENT_WAIT_SECONDS
        while True:
            for payload, header in self.backend.seen:
                event = json.loads(payload)
                obj = event["data"]["object"]
                if event["type"] == "payment_intent.succeeded" and obj.get("id") == payment_id:
                    return payload, header
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"localstripe delivered no payment event for {payment_id}")
            try:
                got = await asyncio.to_thread(self.backend.deliveries.get, timeout=min(left, 1))
            except queue.Empty:
                continue
            self.backend.seen.append(got)

    def _charge(self, payment_id: str) -> dict[str, Any]:
        charge: dict[str, Any] = self.backend.localstripe.retrieve(payment_id)["latest_charge"]
        return charge

    async def refund_webhook(self, payment_id: str) -> Signed:
        """Signed here: localstripe never emits refund events. The body is Stripe's
        `charge.refunded` as Stripe sends it for a refund from the API or the dashboard."""
        charge = await asyncio.to_thread(self._charge, payment_id)
        return _signed_stripe_event(
            "charge.refunded",
            {
                "id": charge["id"],
                "object": "charge",
                "payment_intent": payment_id,
                "amount_refunded": charge["amount_refunded"],
            },
        )

    async def dispute_webhook(
        self, payment_id: str, outcome: Literal["open", "won", "lost"]
    ) -> Signed:
        """The dispute is set in localstripe (the bank's side; tests/localstripe.py adds
        disputes), its event signed here: localstripe emits no dispute events. Like Stripe's,
        the dispute names only its charge, which the provider maps to the payment."""
        charge = await asyncio.to_thread(self._charge, payment_id)
        status = "needs_response" if outcome == "open" else outcome
        dispute_id = "dp_" + charge["id"].removeprefix("ch_")
        await asyncio.to_thread(
            self.backend.localstripe.set_dispute, dispute_id, charge["id"], status, charge["amount"]
        )
        dispute = {
            "id": "dp_" + charge["id"].removeprefix("ch_"),
            "object": "dispute",
            "charge": charge["id"],
            "status": "needs_response" if outcome == "open" else outcome,
            "amount": charge["amount"],
        }
        event_type = "charge.dispute.created" if outcome == "open" else "charge.dispute.closed"
        return _signed_stripe_event(event_type, dispute)

    async def card_now_behaves_as(self, card: SavedCard, number: str) -> None:
        # localstripe asks for authentication on 3155 off-session too; 3184 it treats alike.
        await asyncio.to_thread(self.backend.localstripe.swap_card, card.payment_method_id, number)


def _signed_stripe_event(event_type: str, data_object: dict[str, Any]) -> Signed:
    payload = json.dumps(
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "object": "event",
            "type": event_type,
            "created": int(time.time()),
            "livemode": False,
            "data": {"object": data_object},
        }
    ).encode()
    return payload, signing.sign(payload, WEBHOOK_SECRET)


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
async def engine(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    """The session's PostgreSQL database, emptied for this test."""
    db = create_engine(postgres_url)
    tables = ", ".join(table.name for table in reversed(metadata.sorted_tables))
    async with db.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    yield db
    await db.dispose()


@pytest.fixture(params=["sandbox", "stripe"])
async def harness(request: pytest.FixtureRequest, engine: AsyncEngine) -> AsyncIterator[Harness]:
    if request.param == "sandbox":
        delivered: list[Signed] = []

        async def capture(payload: bytes, header: str) -> None:
            delivered.append((payload, header))  # handed to the inbox by the test, not at once

        yield SandboxHarness(SandboxProvider(engine, WEBHOOK_SECRET, capture), delivered)
        return
    backend: StripeBackend = request.getfixturevalue("stripe_backend")
    provider = StripeProvider(
        TEST_API_KEY,
        WEBHOOK_SECRET,
        "pk_test_localstripe",
        api_base=backend.localstripe.base_url,
        max_network_retries=0,
    )
    try:
        yield StripeHarness(provider, backend)
    finally:
        await provider.aclose()


# --- helpers ------------------------------------------------------------------------------------


async def start(engine: AsyncEngine, harness: Harness, key: str | None = None) -> PaymentResult:
    """Start and record a purchase the way the API and the buy link do."""
    user = f"contract-{uuid.uuid4().hex[:12]}@example.com"
    order = service.PurchaseOrder(Identity("oauth:google", user), user, key)
    async with unit_of_work(engine) as work:
        started = await service.start_purchase(work, harness.provider, PRICING, order)
    return started.payment


async def reconcile(engine: AsyncEngine, harness: Harness, payment_id: str) -> str:
    async with unit_of_work(engine) as work:
        return await service.reconcile_purchase(work, harness.provider, payment_id)


async def now(harness: Harness, payment_id: str) -> PaymentResult:
    """The payment once it has left `processing` (test cards settle at once)."""
    deadline = time.monotonic() + 5
    while True:
        payment = await harness.provider.get_payment(payment_id)
        assert payment is not None
        if payment.state != "processing" or time.monotonic() > deadline:
            return payment
        await asyncio.sleep(0.05)


async def purchase_row(engine: AsyncEngine, harness: Harness, payment_id: str) -> Any:
    async with engine.connect() as conn:
        return await service.get_purchase(conn, harness.provider.name, payment_id)


async def paid_uses(engine: AsyncEngine, account_id: str) -> tuple[int, int]:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                select(accounts.c.paid_uses_remaining, accounts.c.held_uses).where(
                    accounts.c.id == account_id
                )
            )
        ).one()
    return int(row.paid_uses_remaining), int(row.held_uses)


async def receive(engine: AsyncEngine, harness: Harness, signed: Signed) -> str:
    async with unit_of_work(engine) as work:
        return (await inbox.receive(work, harness.provider, *signed)).outcome


async def paid_and_credited(engine: AsyncEngine, harness: Harness) -> PaymentResult:
    payment = await start(engine, harness)
    await harness.pay(payment, CARD_SUCCEEDS)
    assert (await now(harness, payment.payment_id)).state == "succeeded"
    assert await receive(engine, harness, await harness.payment_webhook(payment.payment_id)) == (
        "credited"
    )
    return payment


# --- the contract -------------------------------------------------------------------------------


async def test_create_and_get_payment(engine: AsyncEngine, harness: Harness) -> None:
    payment = await start(engine, harness)

    assert (payment.state, payment.amount_minor, payment.currency) == ("pending", 500, "USD")
    assert payment.client_secret
    assert payment.failure_message is None
    assert payment.amount_refunded_minor == 0
    fetched = await harness.provider.get_payment(payment.payment_id)
    assert fetched is not None
    assert (fetched.payment_id, fetched.state, fetched.amount_minor, fetched.metadata) == (
        payment.payment_id,
        "pending",
        500,
        payment.metadata,
    )
    assert await harness.provider.confirm_payment(payment.payment_id) is False
    row = await purchase_row(engine, harness, payment.payment_id)
    assert (row.status, service.api_status(row.status)) == ("pending", "requires_payment_method")


async def test_get_payment_of_an_unknown_payment_is_none(harness: Harness) -> None:
    assert await harness.provider.get_payment("pi_" + uuid.uuid4().hex) is None


async def test_a_retried_start_finds_the_same_payment(
    engine: AsyncEngine, harness: Harness
) -> None:
    """Idempotency is ours, not only the provider's (localstripe ignores Idempotency-Key)."""
    key = f"contract-{uuid.uuid4().hex}"
    first = await start(engine, harness, key)
    again = await start(engine, harness, key)

    assert again.payment_id == first.payment_id
    assert again.client_secret == first.client_secret
    async with engine.connect() as conn:
        count = await conn.scalar(select(func.count()).select_from(purchases))
    assert count == 1


async def test_confirmed_payment_succeeds_and_its_signed_webhook_credits_once(
    engine: AsyncEngine, harness: Harness
) -> None:
    payment = await start(engine, harness)
    await harness.pay(payment, CARD_SUCCEEDS)

    paid = await now(harness, payment.payment_id)
    assert (paid.state, paid.amount_minor, paid.failure_message) == ("succeeded", 500, None)
    assert await harness.provider.confirm_payment(payment.payment_id) is True

    signed = await harness.payment_webhook(payment.payment_id)
    event = await harness.provider.verify_webhook(*signed)
    assert event.subject == PaymentEvent(payment.payment_id)
    assert event.payment_id == payment.payment_id
    assert await receive(engine, harness, signed) == "credited"
    assert await receive(engine, harness, signed) == "duplicate"
    row = await purchase_row(engine, harness, payment.payment_id)
    assert (row.status, row.credited_at is not None) == ("succeeded", True)
    assert await paid_uses(engine, row.account_id) == (20, 0)


async def test_declined_card_fails_the_purchase(engine: AsyncEngine, harness: Harness) -> None:
    payment = await start(engine, harness)
    await harness.pay(payment, CARD_DECLINED)

    declined = await now(harness, payment.payment_id)
    assert declined.state == "failed"
    assert declined.failure_message
    assert await harness.provider.confirm_payment(payment.payment_id) is False
    assert await reconcile(engine, harness, payment.payment_id) == ("failed")
    row = await purchase_row(engine, harness, payment.payment_id)
    assert (row.status, row.credited_at, row.failure_message) == (
        "failed",
        None,
        declined.failure_message,
    )


@pytest.mark.parametrize("success", [True, False], ids=["authenticated", "refused"])
async def test_3d_secure(engine: AsyncEngine, harness: Harness, success: bool) -> None:
    payment = await start(engine, harness)
    await harness.pay(payment, CARD_NEEDS_3DS)

    assert (await now(harness, payment.payment_id)).state == "requires_action"
    assert await harness.provider.confirm_payment(payment.payment_id) is False
    assert await reconcile(engine, harness, payment.payment_id) == ("status_updated")
    assert (await purchase_row(engine, harness, payment.payment_id)).status == "requires_action"

    await harness.authenticate(payment, success)
    after = await now(harness, payment.payment_id)
    assert after.state == ("succeeded" if success else "failed")
    assert await harness.provider.confirm_payment(payment.payment_id) is success
    if not success:
        assert after.failure_message


async def test_forged_webhooks_are_refused_and_nothing_is_stored(
    engine: AsyncEngine, harness: Harness
) -> None:
    payment = await start(engine, harness)
    await harness.pay(payment, CARD_SUCCEEDS)
    payload, header = await harness.payment_webhook(payment.payment_id)
    event = json.loads(payload)
    event["data"]["object"]["amount"] = 5  # a cheaper payment, under the original signature
    tampered = json.dumps(event).encode()
    stale = int(time.time()) - 3600
    forgeries = [
        (payload, signing.sign(payload, "whsec_attacker")),  # the wrong secret
        (tampered, header),  # a body the signature does not cover
        (payload, signing.sign(payload, WEBHOOK_SECRET, stale)),  # replayed an hour later
        (payload, ""),  # no signature
        (payload, "t=1,v1=00"),  # a malformed one
    ]
    assert tampered != payload
    for body, forged in forgeries:
        with pytest.raises(InvalidWebhookSignature):
            await harness.provider.verify_webhook(body, forged)
        with pytest.raises(InvalidWebhookSignature):
            async with unit_of_work(engine) as work:
                await inbox.receive(work, harness.provider, body, forged)
    not_an_event = b'{"id": "evt_1"}'
    with pytest.raises(InvalidWebhookSignature):
        await harness.provider.verify_webhook(
            not_an_event, signing.sign(not_an_event, WEBHOOK_SECRET)
        )
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(webhook_events)) == 0
    row = await purchase_row(engine, harness, payment.payment_id)
    assert row.credited_at is None


async def test_refund_partial_then_the_rest(engine: AsyncEngine, harness: Harness) -> None:
    payment = await paid_and_credited(engine, harness)

    await harness.provider.refund_payment(payment.payment_id, 125, f"refund-{uuid.uuid4().hex}")
    partly = await harness.provider.get_payment(payment.payment_id)
    assert partly is not None
    assert (partly.state, partly.amount_refunded_minor) == ("succeeded", 125)
    signed = await harness.refund_webhook(payment.payment_id)
    event = await harness.provider.verify_webhook(*signed)
    assert event.subject == RefundEvent(payment.payment_id)
    assert await receive(engine, harness, signed) == "refunded"
    assert await receive(engine, harness, signed) == "duplicate"
    row = await purchase_row(engine, harness, payment.payment_id)
    assert (row.status, row.refunded_minor, row.uses_refunded) == ("partially_refunded", 125, 5)

    # The rest, named explicitly as our refunds service always does (localstripe refunds the
    # whole amount again for an amount-less refund after a partial one; Stripe would not).
    await harness.provider.refund_payment(payment.payment_id, 375)
    fully = await harness.provider.get_payment(payment.payment_id)
    assert fully is not None
    assert fully.amount_refunded_minor == 500
    assert await receive(engine, harness, await harness.refund_webhook(payment.payment_id)) == (
        "refunded"
    )
    row = await purchase_row(engine, harness, payment.payment_id)
    assert (row.status, row.refunded_minor, row.uses_refunded) == ("refunded", 500, 20)
    assert await paid_uses(engine, row.account_id) == (0, 0)


async def test_full_refund(engine: AsyncEngine, harness: Harness) -> None:
    payment = await paid_and_credited(engine, harness)

    refund_id = await harness.provider.refund_payment(payment.payment_id, None)

    assert refund_id
    refunded = await harness.provider.get_payment(payment.payment_id)
    assert refunded is not None
    assert refunded.amount_refunded_minor == 500
    assert await receive(engine, harness, await harness.refund_webhook(payment.payment_id)) == (
        "refunded"
    )
    row = await purchase_row(engine, harness, payment.payment_id)
    assert (row.status, row.refunded_minor, row.uses_refunded) == ("refunded", 500, 20)
    assert await paid_uses(engine, row.account_id) == (0, 0)


@pytest.mark.parametrize("outcome", ["won", "lost"])
async def test_dispute_holds_then_closes(
    engine: AsyncEngine, harness: Harness, outcome: Literal["won", "lost"]
) -> None:
    payment = await paid_and_credited(engine, harness)
    account_id = (await purchase_row(engine, harness, payment.payment_id)).account_id

    opened = await harness.dispute_webhook(payment.payment_id, "open")
    event = await harness.provider.verify_webhook(*opened)
    assert isinstance(event.subject, DisputeEvent)
    assert event.subject.dispute_id is not None
    shown = await harness.provider.get_dispute(event.subject.dispute_id)
    assert shown is not None
    assert (shown.payment_id, shown.state, shown.amount_minor) == (payment.payment_id, "open", 500)
    assert await receive(engine, harness, opened) == "held"
    assert await paid_uses(engine, account_id) == (0, 20)

    closed = await harness.dispute_webhook(payment.payment_id, outcome)
    closing = await harness.provider.verify_webhook(*closed)
    assert isinstance(closing.subject, DisputeEvent)
    assert closing.subject.dispute_id == event.subject.dispute_id
    closed_now = await harness.provider.get_dispute(closing.subject.dispute_id)
    assert closed_now is not None
    assert closed_now.state == outcome
    assert await receive(engine, harness, closed) == f"dispute_{outcome}"
    assert await paid_uses(engine, account_id) == ((20, 0) if outcome == "won" else (0, 0))


async def test_reconcile_credits_a_payment_whose_webhook_never_came(
    engine: AsyncEngine, harness: Harness
) -> None:
    payment = await start(engine, harness)
    await harness.pay(payment, CARD_SUCCEEDS)
    assert (await now(harness, payment.payment_id)).state == "succeeded"

    async with engine.connect() as conn:
        open_ids = [p.payment_id for p in await service.open_purchases(conn, harness.provider.name)]
    assert payment.payment_id in open_ids
    outcome = await reconcile(engine, harness, payment.payment_id)
    assert outcome == "credited"
    again = await reconcile(engine, harness, payment.payment_id)
    assert again == "already_credited"
    async with engine.connect() as conn:
        open_ids = [p.payment_id for p in await service.open_purchases(conn, harness.provider.name)]
    assert payment.payment_id not in open_ids
    row = await purchase_row(engine, harness, payment.payment_id)
    assert await paid_uses(engine, row.account_id) == (20, 0)


# --- saved cards and off-session payments (auto top-up) -----------------------------------------


async def saved_card(engine: AsyncEngine, harness: Harness, card: str = CARD_SUCCEEDS) -> SavedCard:
    """A customer pays a purchase asking to keep the card: the provider saves it."""
    payment = await start(engine, harness)
    await harness.pay(payment, card, save_card=True)
    if card in (CARD_NEEDS_3DS, CARD_ALWAYS_3DS):
        await harness.authenticate(payment, True)
    paid = await now(harness, payment.payment_id)
    assert paid.state == "succeeded"
    assert paid.saved_card is not None
    return paid.saved_card


async def pay_off_session(
    engine: AsyncEngine, harness: Harness, card: SavedCard
) -> tuple[PaymentResult, str]:
    """Charge the saved card for one pack, recorded as a purchase (as auto top-up does)."""
    account_id = card.customer_id  # any id of ours: the provider only carries it back
    purchase_id = f"pur_{uuid.uuid4().hex[:24]}"
    payment = await harness.provider.pay_off_session(
        OffSessionPayment(
            amount_minor=500,
            currency="USD",
            purchase_id=purchase_id,
            account_id=account_id,
            customer_id=card.customer_id,
            payment_method_id=card.payment_method_id,
            idempotency_key=f"auto-topup-{uuid.uuid4().hex}",
        )
    )
    return payment, purchase_id


async def test_a_payment_that_saves_its_card_keeps_only_ids_brand_and_last4(
    engine: AsyncEngine, harness: Harness
) -> None:
    card = await saved_card(engine, harness)

    assert card.payment_method_id.startswith("pm_")
    assert card.customer_id.startswith("cus_")
    assert (card.brand, card.last4) == ("visa", "4242")
    # A payment that did not ask to keep its card saves none.
    plain = await start(engine, harness)
    await harness.pay(plain, CARD_SUCCEEDS)
    assert (await now(harness, plain.payment_id)).saved_card is None


async def test_a_customer_is_made_once_per_key(engine: AsyncEngine, harness: Harness) -> None:
    customer = await harness.provider.create_customer("acc_contract", "customer-acc_contract")
    assert customer.startswith("cus_")


async def test_off_session_payment_succeeds_and_its_webhook_credits_once(
    engine: AsyncEngine, harness: Harness
) -> None:
    card = await saved_card(engine, harness)
    payment, purchase_id = await pay_off_session(engine, harness, card)

    paid = await now(harness, payment.payment_id)
    assert (paid.state, paid.amount_minor, paid.currency) == ("succeeded", 500, "USD")
    assert paid.metadata["ciris_purchase_id"] == purchase_id
    # Recorded as the purchase it pays, it is credited by its webhook like any other.
    user = f"contract-{uuid.uuid4().hex[:12]}@example.com"
    async with unit_of_work(engine) as work:
        conn = await work.connection()
        account, _ = await ensure_account(conn, Identity("oauth:google", user), PRICING)
        await service.record_purchase(
            conn,
            purchase_id=purchase_id,
            account_id=account.id,
            provider=harness.provider.name,
            payment=payment,
            offer=service.Offer(500, "USD", 20),
            customer_email=None,
        )
    signed = await harness.payment_webhook(payment.payment_id)
    assert await receive(engine, harness, signed) == "credited"
    assert await receive(engine, harness, signed) == "duplicate"
    assert await paid_uses(engine, account.id) == (20, 0)


async def test_a_declined_saved_card_is_a_failed_payment_not_an_error(
    engine: AsyncEngine, harness: Harness
) -> None:
    card = await saved_card(engine, harness)
    await harness.card_now_behaves_as(card, CARD_DECLINED)

    payment, _ = await pay_off_session(engine, harness, card)

    declined = await now(harness, payment.payment_id)
    assert declined.state == "failed"
    assert declined.failure_message


async def test_a_bank_asking_for_authentication_is_requires_action(
    engine: AsyncEngine, harness: Harness
) -> None:
    card = await saved_card(engine, harness)
    await harness.card_now_behaves_as(card, CARD_ALWAYS_3DS)

    payment, _ = await pay_off_session(engine, harness, card)

    waiting = await now(harness, payment.payment_id)
    assert waiting.state == "requires_action"
    assert waiting.client_secret  # the payment page completes it with the customer
    if waiting.provider_status == "requires_action":  # (Stripe may want a new confirmation)
        await harness.authenticate(waiting, True)
        assert (await now(harness, payment.payment_id)).state == "succeeded"


async def test_find_payment_finds_a_payment_whose_answer_was_lost(
    engine: AsyncEngine, harness: Harness
) -> None:
    card = await saved_card(engine, harness)
    payment, purchase_id = await pay_off_session(engine, harness, card)

    found = await harness.provider.find_payment(card.customer_id, purchase_id)
    assert found is not None
    assert (found.payment_id, found.state) == (payment.payment_id, "succeeded")
    assert await harness.provider.find_payment(card.customer_id, "pur_never") is None


async def test_a_detached_card_is_no_longer_saved(engine: AsyncEngine, harness: Harness) -> None:
    payment = await start(engine, harness)
    await harness.pay(payment, CARD_SUCCEEDS, save_card=True)
    card = (await now(harness, payment.payment_id)).saved_card
    assert card is not None

    await harness.provider.detach_card(card.payment_method_id)
    await harness.provider.detach_card(card.payment_method_id)  # again: no error

    assert (await now(harness, payment.payment_id)).saved_card is None
    if isinstance(harness, SandboxHarness):  # (localstripe charges detached cards anyway)
        with pytest.raises(ProviderError):
            await pay_off_session(engine, harness, card)
