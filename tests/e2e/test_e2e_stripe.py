"""End to end with PAYMENT_PROVIDER=stripe against localstripe: the official SDK, real
HTTP, real signed webhooks delivered by localstripe to the running service, PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from ciris_billing.db import create_engine
from ciris_billing.payments.providers import signing
from tests.support.cli import cli, create_key
from tests.support.localstripe import (
    CARD_DECLINED_AT_CHARGE,
    CARD_REQUIRES_3DS,
    TEST_API_KEY,
    run_localstripe,
)
from tests.support.postgres import truncate
from tests.support.servers import running_service
from tests.support.stripe_stack import PUBLISHABLE_KEY, WEBHOOK_SECRET, Stack, stripe_env

pytestmark = pytest.mark.slow  # a real service process and localstripe


@pytest.fixture(scope="module")
def stack(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import asyncio

    asyncio.run(truncate(postgres_url))
    state_dir = tmp_path_factory.mktemp("localstripe")
    with run_localstripe(state_dir) as stripe_server:
        env = stripe_env(postgres_url, stripe_server.base_url)
        key = create_key(env)
        log_path = state_dir / "service.log"
        with running_service(env, log_path) as base:
            stripe_server.register_webhook(f"{base}/v1/billing/webhooks/stripe", WEBHOOK_SECRET)
            yield Stack(base, key, stripe_server, env, log_path)


def test_purchase_paid_on_stripe_credits_20_uses(stack: Stack, postgres_url: str) -> None:
    user = "stripe-buyer@example.com"
    for _ in range(3):
        assert (
            stack.post(
                "/v1/billing/charges", {"oauth_provider": "oauth:google", "external_id": user}
            ).status_code
            == 201
        )
    assert stack.check(user)["purchase_required"] is True

    bought = stack.purchase(user)
    assert bought["payment_id"].startswith("pi_")
    assert bought["client_secret"]
    assert bought["publishable_key"] == PUBLISHABLE_KEY
    assert (bought["amount_minor"], bought["currency"], bought["uses_purchased"]) == (
        500,
        "USD",
        20,
    )
    intent = stack.stripe.retrieve(bought["payment_id"])
    assert intent["metadata"]["ciris_purchase_id"] == bought["purchase_id"]
    assert intent["metadata"]["ciris_account_id"] == bought["account_id"]

    paid = stack.stripe.pay(bought["payment_id"])  # the customer's browser, pm_card_visa
    assert paid["status"] == "succeeded"
    assert stack.wait_for_purchase(bought["payment_id"], "succeeded")["credited"] is True

    after = stack.check(user)
    assert after["credits_remaining"] == 20
    assert after["purchase_required"] is False
    assert after["has_credit"] is True

    async def guide_query() -> list[Any]:
        engine = create_engine(postgres_url)
        async with engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT * FROM credits WHERE external_transaction_id LIKE 'pi_%' "
                    "ORDER BY created_at DESC LIMIT 10"
                )
            )
            found = list(rows)
        await engine.dispose()
        return found

    import asyncio

    rows = asyncio.run(guide_query())
    assert bought["payment_id"] in [row.external_transaction_id for row in rows]

    logs = stack.log_path.read_text()
    assert '"event": "stripe_webhook_received"' in logs
    assert '"event": "stripe_payment_credited"' in logs
    for secret in (TEST_API_KEY, WEBHOOK_SECRET, bought["client_secret"], stack.key):
        assert secret not in logs


def test_declined_card_fails_the_purchase(stack: Stack) -> None:
    user = "stripe-declined@example.com"
    bought = stack.purchase(user)
    card = stack.stripe.create_card_payment_method(CARD_DECLINED_AT_CHARGE)
    stack.stripe.pay(bought["payment_id"], card)
    failed = stack.wait_for_purchase(bought["payment_id"], "failed")
    assert failed["status"] == "failed"
    assert failed["credited"] is False
    assert stack.check(user)["credits_remaining"] == 0


def test_3ds_card_requires_action_then_credits(stack: Stack) -> None:
    user = "stripe-3ds@example.com"
    bought = stack.purchase(user)
    card = stack.stripe.create_card_payment_method(CARD_REQUIRES_3DS)
    assert stack.stripe.pay(bought["payment_id"], card)["status"] == "requires_action"
    stack.stripe.authenticate(bought["payment_id"], bought["client_secret"], success=True)
    assert stack.wait_for_purchase(bought["payment_id"], "succeeded")["credited"] is True
    assert stack.check(user)["credits_remaining"] == 20


def test_forged_webhook_is_refused(stack: Stack) -> None:
    bought = stack.purchase("stripe-forged@example.com")
    payload = (
        b'{"id":"evt_forged","object":"event","type":"payment_intent.succeeded","created":1,'
        b'"data":{"object":{"id":"'
        + bought["payment_id"].encode()
        + b'","object":"payment_intent"}}}'
    )
    forged = httpx.post(
        f"{stack.base}/v1/billing/webhooks/stripe",
        content=payload,
        headers={"Stripe-Signature": signing.sign(payload, "whsec_attacker")},
    )
    assert forged.status_code == 400
    assert stack.check("stripe-forged@example.com")["credits_remaining"] == 0


def test_audit_is_clean_after_the_stripe_flows(stack: Stack) -> None:
    audited = cli(stack.env, "audit")
    assert audited.returncode == 0, audited.stdout


def test_provider_down_while_confirming_is_credited_by_reconcile(
    fresh_database: str, tmp_path: Path
) -> None:
    """Stripe unreachable when the webhook arrives: 503, not handled; reconcile credits once."""
    # Its own localstripe knows only its own payments: a database of its own, so the audit
    # (which asks the provider about every purchase) sees only those.
    postgres_url = fresh_database
    user = "stripe-outage@example.com"
    with run_localstripe(tmp_path / "ls") as stripe_server:
        env = stripe_env(postgres_url, stripe_server.base_url)
        key = create_key(env)
        with running_service(env, tmp_path / "service.log") as base:
            stack = Stack(base, key, stripe_server, env, tmp_path / "service.log")
            bought = stack.purchase(user)
            assert stripe_server.pay(bought["payment_id"])["status"] == "succeeded"
        # (no webhook registered: this one is lost)
    # localstripe is stopped; its state stays in tmp_path / "ls".
    payload = (
        b'{"id":"evt_outage","object":"event","type":"payment_intent.succeeded","created":'
        + str(int(time.time())).encode()
        + b',"data":{"object":{"id":"'
        + bought["payment_id"].encode()
        + b'","object":"payment_intent"}}}'
    )
    with running_service(env, tmp_path / "service2.log") as base:
        delivered = httpx.post(
            f"{base}/v1/billing/webhooks/stripe",
            content=payload,
            headers={"Stripe-Signature": signing.sign(payload, WEBHOOK_SECRET)},
            timeout=60,
        )
        assert delivered.status_code == 503
        assert delivered.json()["error"] == "payment_provider_unavailable"
        stack = Stack(base, key, stripe_server, env, tmp_path / "service2.log")
        assert stack.check(user)["credits_remaining"] == 0

    with run_localstripe(tmp_path / "ls") as back:  # the same state, a new port
        env_back = stripe_env(postgres_url, back.base_url)
        assert back.retrieve(bought["payment_id"])["status"] == "succeeded"
        first = cli(env_back, "reconcile")
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"{bought['payment_id']}: credited" in first.stdout
        replay = cli(env_back, "webhooks", "replay")
        assert "evt_outage: already_credited" in replay.stdout, replay.stdout + replay.stderr
        with running_service(env_back, tmp_path / "service3.log") as base:
            stack = Stack(base, key, back, env_back, tmp_path / "service3.log")
            assert stack.check(user)["credits_remaining"] == 20
        audited = cli(env_back, "audit")
        assert audited.returncode == 0, audited.stdout.splitlines()[:5]


# Money going back, against localstripe (refunds through the official SDK; localstripe sends
# no charge.refunded or dispute events, so those are built and signed here, as Stripe would).


def paid(stack: Stack, user: str) -> dict[str, Any]:
    bought = stack.purchase(user)
    stack.stripe.pay(bought["payment_id"])
    assert stack.wait_for_purchase(bought["payment_id"], "succeeded")["credited"] is True
    return bought


def refund(stack: Stack, payment_id: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return stack.post(f"/v1/billing/purchases/{payment_id}/refund", body, **headers)


def deliver(
    stack: Stack, event_type: str, data_object: dict[str, Any], event_id: str
) -> httpx.Response:
    payload = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created": int(time.time()),
            "data": {"object": data_object},
        }
    ).encode()
    return httpx.post(
        f"{stack.base}/v1/billing/webhooks/stripe",
        content=payload,
        headers={"Stripe-Signature": signing.sign(payload, WEBHOOK_SECRET)},
        timeout=30,
    )


def test_refunds_through_stripe(stack: Stack) -> None:
    full = paid(stack, "ls-full@example.com")
    body = refund(stack, full["payment_id"], {}).json()
    assert (body["amount_minor"], body["uses_reversed"], body["purchase_status"]) == (
        500,
        20,
        "refunded",
    )
    assert stack.stripe.retrieve(full["payment_id"])["latest_charge"]["amount_refunded"] == 500
    assert stack.check("ls-full@example.com")["credits_remaining"] == 0

    part = paid(stack, "ls-part@example.com")
    first = refund(stack, part["payment_id"], {"amount_minor": 125}, **{"Idempotency-Key": "ls-k1"})
    again = refund(stack, part["payment_id"], {"amount_minor": 125}, **{"Idempotency-Key": "ls-k1"})
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert first.json()["uses_refunded"] == 5
    beyond = refund(
        stack, part["payment_id"], {"amount_minor": 400}, **{"Idempotency-Key": "ls-k2"}
    )
    assert beyond.status_code == 422
    assert stack.stripe.retrieve(part["payment_id"])["latest_charge"]["amount_refunded"] == 125
    assert stack.check("ls-part@example.com")["credits_remaining"] == 15

    spent = paid(stack, "ls-spent@example.com")
    for _ in range(3 + 18):
        stack.post(
            "/v1/billing/charges",
            {"oauth_provider": "oauth:google", "external_id": "ls-spent@example.com"},
        )
    body = refund(stack, spent["payment_id"], {}).json()
    assert (body["uses_reversed"], body["shortfall_uses"]) == (2, 18)
    assert stack.check("ls-spent@example.com")["credits_remaining"] == 0


def test_dashboard_refund_by_charge_refunded_webhook_applies_once(stack: Stack) -> None:
    user = "ls-dashboard@example.com"
    bought = paid(stack, user)
    charge = stack.stripe.retrieve(bought["payment_id"])["latest_charge"]
    # The refund is made in Stripe's dashboard: only the webhook tells us.
    refund_made = httpx.post(
        f"{stack.stripe.base_url}/v1/refunds",
        data={"payment_intent": bought["payment_id"], "amount": "250"},
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
    )
    assert refund_made.status_code == 200
    event = {
        "id": charge["id"],
        "object": "charge",
        "payment_intent": bought["payment_id"],
        "amount_refunded": 250,
    }
    for _ in range(2):
        response = deliver(stack, "charge.refunded", event, f"evt_refund_{charge['id']}")
        assert response.status_code == 200
    deliver(stack, "charge.refunded", event, f"evt_refund_again_{charge['id']}")
    assert stack.check(user)["credits_remaining"] == 10
    status = stack.get(f"/v1/billing/purchases/{bought['payment_id']}").json()
    assert status["status"] == "partially_refunded"
    # The API refund of the rest afterwards takes only what is left.
    rest = refund(stack, bought["payment_id"], {}).json()
    assert (rest["amount_minor"], rest["uses_refunded"]) == (250, 20)
    assert stack.check(user)["credits_remaining"] == 0


@pytest.mark.parametrize(
    ("outcome", "order", "credits_after"),
    [
        ("lost", ["created", "created", "closed", "closed"], 0),
        ("lost", ["closed", "created", "closed", "created"], 0),
        ("won", ["created", "closed", "created", "closed"], 20),
        ("won", ["closed", "closed", "created", "created"], 20),
    ],
)
def test_disputes_in_any_order_hold_once_and_close_once(
    stack: Stack, outcome: str, order: list[str], credits_after: int
) -> None:
    user = f"ls-dispute-{outcome}-{order[0]}@example.com"
    bought = paid(stack, user)
    charge_id = stack.stripe.retrieve(bought["payment_id"])["latest_charge"]["id"]
    dispute_id = "dp_" + charge_id.removeprefix("ch_")
    # No payment_intent field: the service must map the charge to its payment via Stripe.
    objects = {
        "created": {
            "id": dispute_id,
            "object": "dispute",
            "charge": charge_id,
            "status": "needs_response",
            "amount": 500,
        },
        "closed": {
            "id": dispute_id,
            "object": "dispute",
            "charge": charge_id,
            "status": outcome,
            "amount": 500,
        },
    }
    for index, step in enumerate(order):
        # Stripe's own state at the time (the service asks it, whatever an event says): open
        # until the dispute is closed, events arriving in any order.
        closed = "closed" in order[: index + 1]
        stack.stripe.set_dispute(
            dispute_id, charge_id, outcome if closed else "needs_response", 500
        )
        response = deliver(
            stack, f"charge.dispute.{step}", objects[step], f"evt_{dispute_id}_{step}"
        )
        assert response.status_code == 200, response.text
        if "closed" not in order[: index + 1]:
            assert stack.check(user)["credits_remaining"] == 0, "held while open"
    assert stack.check(user)["credits_remaining"] == credits_after
    export = stack.get(f"/v1/billing/accounts/oauth:google/{user}/export").json()
    kinds = sorted(c["kind"] for c in export["credits"] if c["kind"].startswith("dispute"))
    assert kinds == ["dispute_hold", f"dispute_{outcome}"]
    assert export["account"]["held_uses"] == 0
    assert cli(stack.env, "audit").returncode == 0


def test_agent_client_end_to_end(stack: Stack) -> None:
    """The agent's own client against the running service and Stripe (localstripe)."""
    from ciris_billing_client import BillingClient, PurchaseRequiredError

    user = "ls-agent@example.com"
    with BillingClient(stack.base, stack.key, backoff=0.01) as billing:
        for _ in range(3):
            assert billing.check("oauth:google", user).has_credit
            billing.charge("oauth:google", user, description="chat turn")
        with pytest.raises(PurchaseRequiredError) as refused:
            billing.charge("oauth:google", user)
        assert (refused.value.offer.uses, refused.value.offer.price_minor) == (20, 500)
        assert refused.value.checkout_url is not None
        assert "/v1/billing/buy/" in refused.value.checkout_url

        bought = billing.purchase("oauth:google", user)
        assert bought.checkout_url is not None
        stack.stripe.pay(bought.payment_id)
        deadline = time.monotonic() + 20
        while billing.purchase_status(bought.payment_id).status != "succeeded":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        after = billing.check("oauth:google", user)
        assert (after.has_credit, after.credits_remaining) == (True, 20)
        charged = billing.charge("oauth:google", user, idempotency_key="msg-42")
        again = billing.charge("oauth:google", user, idempotency_key="msg-42")
        assert again.replayed
        assert again.charge_id == charged.charge_id
        ledger = billing.transactions("oauth:google", user)
        assert ledger.transactions[0].kind == "charge"


def test_a_euro_pack_with_a_promotion_code(stack: Stack) -> None:
    """Issue 24 item 5: the PaymentIntent carries the discounted amount, the pack's currency and
    metadata pack_id / promotion_code; paid, the lot is the pack's at what was paid."""
    user = "stripe-euro@example.com"
    pack = {"pack_id": "e2e-eur", "name": "100 uses", "uses": 100, "price_minor": 2000,
            "currency": "EUR", "expires_in_days": 30}  # fmt: skip
    assert stack.post("/v1/billing/packs", pack).status_code == 201
    code = {"code": "E2E25", "percent_off": 25, "pack_ids": ["e2e-eur"], "max_redemptions": 5}
    assert stack.post("/v1/billing/promotion_codes", code).status_code == 201
    identity = {"oauth_provider": "oauth:google", "external_id": user}
    assert stack.post("/v1/billing/accounts", {**identity, "currency": "EUR"}).status_code in (
        200,
        201,
    )
    response = stack.post(
        "/v1/billing/purchases", {**identity, "pack_id": "e2e-eur", "promotion_code": "E2E25"}
    )
    assert response.status_code == 201, response.text
    bought = response.json()
    assert (bought["amount_minor"], bought["currency"], bought["uses_purchased"]) == (
        1500, "EUR", 100,
    )  # fmt: skip
    intent = stack.stripe.retrieve(bought["payment_id"])
    assert (intent["amount"], intent["currency"]) == (1500, "eur")
    assert intent["metadata"]["pack_id"] == "e2e-eur"
    assert intent["metadata"]["promotion_code"] == "E2E25"
    assert intent["metadata"]["ciris_purchase_id"] == bought["purchase_id"]

    assert stack.stripe.pay(bought["payment_id"])["status"] == "succeeded"
    assert stack.wait_for_purchase(bought["payment_id"], "succeeded")["credited"] is True
    assert stack.check(user)["credits_remaining"] == 100
    lots = stack.get(f"/v1/billing/accounts/oauth:google/{user}/lots").json()["lots"]
    paid = [lot for lot in lots if lot["kind"] == "paid"]
    assert len(paid) == 1
    assert paid[0]["expires_at"] is not None
    codes = stack.get("/v1/billing/promotion_codes").json()["promotion_codes"]
    assert [(c["code"], c["redemptions"]) for c in codes] == [("E2E25", 1)]
