"""Provider faults (PAYMENT_PROVIDER=stripe against localstripe): stopped, answering 500, slow.

Purchases answer 502/503 with a clear error, quickly, and leave no purchase behind; webhook
confirmations that fail are stored unhandled and answered 5xx (so Stripe retries); when the
provider is back, a redelivery credits once and any further delivery changes nothing.

The service reaches localstripe through `HttpFaultProxy` (tests/faults.py) on 127.0.0.1, with
STRIPE_TIMEOUT_SECONDS=1 (the SDK retries twice: a slow provider costs about 4.5 s, no more).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from ciris_billing.db import accounts, create_engine, credits, purchases, webhook_events
from tests.support.cli import cli, create_key
from tests.support.faults import HttpFaultProxy, http_fault_proxy, signed_event
from tests.support.localstripe import LocalStripe, run_localstripe
from tests.support.postgres import truncate
from tests.support.servers import running_service
from tests.support.stripe_stack import WEBHOOK_SECRET, stripe_env

pytestmark = pytest.mark.slow  # real service processes, localstripe stopped or slowed

TIMEOUT_SECONDS = "1"
# Three attempts of 1 s, 0.5 s + 1 s of back-off between them, and some room for a busy machine.
WORST_SECONDS = 10.0


@dataclass
class Faulty:
    """The service, talking to localstripe through the fault proxy."""

    base: str
    key: str
    proxy: HttpFaultProxy
    env: dict[str, str]
    database_url: str
    state_dir: Path
    stripe: LocalStripe | None = None
    _running: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def start_stripe(self) -> LocalStripe:
        """localstripe (again, with the same state, on a new port), behind the proxy."""
        self.stripe = self._running.enter_context(run_localstripe(self.state_dir))
        self.proxy.upstream = self.stripe.base_url
        return self.stripe

    def stop_stripe(self) -> None:
        self._running.close()
        self.stripe = None

    def post(self, path: str, body: Any, **headers: str) -> httpx.Response:
        return httpx.post(
            self.base + path, json=body, headers={"X-API-Key": self.key, **headers}, timeout=60
        )

    def purchase(self, user: str, **headers: str) -> httpx.Response:
        return self.post(
            "/v1/billing/purchases",
            {"oauth_provider": "oauth:google", "external_id": user, "customer_email": user},
            **headers,
        )

    def credits_remaining(self, user: str) -> int:
        response = self.post(
            "/v1/billing/credits/check",
            {"oauth_provider": "oauth:google", "external_id": user, "context": {}},
        )
        return int(response.json()["credits_remaining"])

    def deliver(self, payload: bytes, headers: dict[str, str]) -> httpx.Response:
        return httpx.post(
            f"{self.base}/v1/billing/webhooks/stripe", content=payload, headers=headers, timeout=60
        )


def _query(database_url: str, statement: Any) -> Any:
    async def run() -> Any:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                return (await conn.execute(statement)).all()
        finally:
            await engine.dispose()

    return asyncio.run(run())


def purchases_of(database_url: str, user: str) -> int:
    rows = _query(
        database_url,
        select(func.count())
        .select_from(purchases.join(accounts, purchases.c.account_id == accounts.c.id))
        .where(accounts.c.external_id == user),
    )
    return int(rows[0][0])


@pytest.fixture(scope="module")
def faulty(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    asyncio.run(truncate(postgres_url))
    state_dir = tmp_path_factory.mktemp("localstripe-faults")
    with http_fault_proxy("http://127.0.0.1:9") as proxy:
        env = {**stripe_env(postgres_url, proxy.url), "STRIPE_TIMEOUT_SECONDS": TIMEOUT_SECONDS}
        key = create_key(env)
        with running_service(env, state_dir / "service.log") as base:
            stack = Faulty(base, key, proxy, env, postgres_url, state_dir)
            stack.start_stripe()
            try:
                yield stack
            finally:
                stack.stop_stripe()


@pytest.fixture(autouse=True)
def _healthy_provider(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts, and leaves the next one, with the provider answering normally."""
    yield
    if "faulty" in request.fixturenames:
        stack: Faulty = request.getfixturevalue("faulty")
        stack.proxy.set(mode="forward")
        stack.proxy.release()
        if stack.stripe is None:
            stack.start_stripe()


def _timed(call: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()
    return response, time.monotonic() - started


def test_purchase_while_localstripe_is_stopped(postgres_url: str, tmp_path: Path) -> None:
    """Nothing listens where Stripe should be: 503 payment_provider_unavailable, no purchase."""
    with run_localstripe(tmp_path / "localstripe") as stopped:
        gone = stopped.base_url
    env = {**stripe_env(postgres_url, gone), "STRIPE_TIMEOUT_SECONDS": TIMEOUT_SECONDS}
    key = create_key(env, "write")
    user = "provider-stopped@example.com"
    with running_service(env, tmp_path / "service.log") as base:
        response, took = _timed(
            lambda: httpx.post(
                f"{base}/v1/billing/purchases",
                json={"oauth_provider": "oauth:google", "external_id": user},
                headers={"X-API-Key": key, "Idempotency-Key": "stopped-1"},
                timeout=60,
            )
        )
        assert response.status_code == 503, response.text
        assert response.json() == {
            "error": "payment_provider_unavailable",
            # A new account's first purchase names its customer at Stripe first (issue 21
            # finding 4: the payer's card can only be saved on the buyer's own customer).
            "detail": "Stripe could not be reached to create the customer; try again later",
        }
        assert took < WORST_SECONDS
        assert httpx.get(f"{base}/health").status_code == 200  # the service itself is fine
    assert purchases_of(postgres_url, user) == 0


def test_purchase_when_stripe_answers_500(faulty: Faulty) -> None:
    """Stripe fails: 502 payment_provider_error, no purchase; the same key works afterwards."""
    user = "provider-500@example.com"
    faulty.proxy.set(mode="error")
    seen_before = len(faulty.proxy.requests_to("/v1/customers"))
    response, took = _timed(lambda: faulty.purchase(user, **{"Idempotency-Key": "p500-1"}))
    assert response.status_code == 502, response.text
    assert response.json() == {
        "error": "payment_provider_error",
        "detail": "Stripe refused to create the customer (http_status=500)",
    }
    assert took < WORST_SECONDS
    # The customer comes first (finding 4), so Stripe's 500 stops the purchase there.
    assert len(faulty.proxy.requests_to("/v1/customers")) > seen_before
    assert purchases_of(faulty.database_url, user) == 0

    faulty.proxy.set(mode="forward")
    retried = faulty.purchase(user, **{"Idempotency-Key": "p500-1"})
    assert retried.status_code == 201, retried.text
    assert retried.headers.get("Idempotent-Replayed") is None  # the failure recorded nothing
    assert purchases_of(faulty.database_url, user) == 1


def test_purchase_when_stripe_is_slow(faulty: Faulty) -> None:
    """Stripe answers after the timeout: 503 within a bounded time, no purchase."""
    user = "provider-slow@example.com"
    faulty.proxy.set(delay=30)
    response, took = _timed(lambda: faulty.purchase(user))
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "payment_provider_unavailable"
    assert took < WORST_SECONDS, f"the purchase took {took:.1f} s to fail"
    assert purchases_of(faulty.database_url, user) == 0
    faulty.proxy.release()
    assert faulty.purchase(user).status_code == 201
    assert purchases_of(faulty.database_url, user) == 1


def test_webhook_confirmation_failures_then_redelivery_credits_once(faulty: Faulty) -> None:
    """payment_intent.succeeded while Stripe answers 500 (502), is slow (503) and is stopped
    (503): stored once, never handled, nothing credited. Stripe back: the redelivery credits
    20 uses once; the next deliveries are duplicates."""
    user = "provider-webhook@example.com"
    bought = faulty.purchase(user)
    assert bought.status_code == 201, bought.text
    payment_id = bought.json()["payment_id"]
    assert faulty.stripe is not None
    assert faulty.stripe.pay(payment_id)["status"] == "succeeded"
    event_id = f"evt_provider_faults_{time.monotonic_ns()}"
    payload, headers = signed_event(event_id, payment_id, WEBHOOK_SECRET)

    faulty.proxy.set(mode="error")
    failed, _ = _timed(lambda: faulty.deliver(payload, headers))
    assert (failed.status_code, failed.json()["error"]) == (502, "payment_provider_error")

    faulty.proxy.set(mode="forward", delay=30)
    slow, took = _timed(lambda: faulty.deliver(payload, headers))
    assert (slow.status_code, slow.json()["error"]) == (503, "payment_provider_unavailable")
    assert took < WORST_SECONDS, f"the webhook took {took:.1f} s to answer"
    faulty.proxy.release()

    faulty.stop_stripe()
    down = faulty.deliver(payload, headers)
    assert (down.status_code, down.json()["error"]) == (503, "payment_provider_unavailable")

    stored = _query(
        faulty.database_url, select(webhook_events).where(webhook_events.c.event_id == event_id)
    )
    assert len(stored) == 1
    assert stored[0].handled_at is None
    assert stored[0].attempts == 3
    assert stored[0].last_error == "payment_provider_unavailable"
    assert faulty.credits_remaining(user) == 0

    faulty.start_stripe()  # the same state, so the payment is still paid
    back = faulty.deliver(payload, headers)
    assert back.status_code == 200, back.text
    assert back.json()["outcome"] == "credited"
    for _ in range(2):
        again = faulty.deliver(payload, headers)
        assert (again.status_code, again.json()["outcome"]) == (200, "duplicate")
    assert faulty.credits_remaining(user) == 20
    rows = _query(
        faulty.database_url,
        select(credits.c.id).where(credits.c.external_transaction_id == payment_id),
    )
    assert len(rows) == 1
    replay = cli(faulty.env, "webhooks", "replay")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert event_id not in replay.stdout
    audited = cli(faulty.env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
