"""The agent client (`ciris_billing_client`) against the real service.

In process (the app behind httpx.ASGITransport, on PostgreSQL), with network faults
injected between client and app by `Network`; and as a real server process on a fixed port,
stopped and started again, for retries, fail-closed and fail-open.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ciris_billing_client import (
    AsyncBillingClient,
    AuthenticationError,
    BillingClient,
    BillingUnavailableError,
    IdempotencyConflictError,
    NotFoundError,
    Offer,
    PurchaseRequiredError,
)
from ciris_billing_client._core import retry_after_seconds
from ciris_billing_client.models import parse_purchase
from tests.support.agent import (
    BASE,
    FAST,
    GOOGLE,
    InProcess,
    Server,
    events,
    new_server,
    serving,
    user,
)


@pytest.fixture
async def billing(database_url: str) -> AsyncIterator[InProcess]:
    async with serving(database_url, InProcess) as served:
        yield served


# -- in process: the API, typed --------------------------------------------------------------


async def test_check_charge_and_ledger_are_typed(billing: InProcess) -> None:
    client, who = billing.client(), user()
    check = await client.check(GOOGLE, who, {"conversation": "c-1"})
    assert (check.has_credit, check.degraded, check.purchase_required) == (True, False, False)
    assert (check.free_uses_remaining, check.credits_remaining, check.total_uses) == (3, 0, 0)
    assert check.plan_name == "free"
    assert check.purchase_price_minor is None
    assert check.next_expiry is None  # nothing of it expires

    charge = await client.charge(
        GOOGLE,
        who,
        amount_minor=100,
        currency="usd",
        description="one chat turn",
        metadata={"model": "m-1", "tokens": 42},
    )
    assert uuid.UUID(charge.idempotency_key).version == 4
    assert (charge.pending, charge.replayed) == (False, False)
    assert charge.charge_id is not None
    assert (charge.uses, charge.free_uses_used, charge.paid_uses_used) == (1, 1, 0)
    assert (charge.amount_minor, charge.currency, charge.description) == (
        100,
        "USD",
        "one chat turn",
    )
    assert charge.metadata == {"model": "m-1", "tokens": 42}
    assert (charge.free_uses_remaining, charge.total_uses) == (2, 1)
    [lot] = charge.lots  # the account's free lot
    assert (lot.lot_id.startswith("lot_"), lot.uses) == (True, 1)
    assert billing.network.sent("/v1/billing/charges")[0].headers["Idempotency-Key"] == (
        charge.idempotency_key
    )

    page = await client.transactions(GOOGLE, who, limit=1)
    assert (page.total, page.limit, page.has_more, len(page.transactions)) == (2, 1, True, 1)
    newest = page.transactions[0]
    assert (newest.type, newest.free_uses_delta, newest.description) == (
        "charge",
        -1,
        "one chat turn",
    )
    assert page.account_id == charge.account_id
    rest = await client.transactions(GOOGLE, who, offset=1)
    assert [t.type for t in rest.transactions] == ["credit"]

    with pytest.raises(NotFoundError) as missing:
        await client.transactions(GOOGLE, user())
    assert (missing.value.status, missing.value.code) == (404, "account_not_found")


async def test_lots_are_typed(billing: InProcess) -> None:
    client, who = billing.client(), user()
    await client.check(GOOGLE, who)
    async with httpx.AsyncClient(transport=billing.network.app, base_url=BASE) as http:
        granted = await http.post(
            "/v1/billing/credits",
            json={"oauth_provider": GOOGLE, "external_id": who, "uses": 4, "reason": "promo",
                  "priority": 1, "expires_in_days": 30},
            headers={"X-API-Key": billing.keys["admin"]},
        )  # fmt: skip
    assert granted.status_code == 201, granted.text
    found = await client.lots(GOOGLE, who)
    assert [(lot.kind, lot.uses_remaining, lot.priority, lot.status) for lot in found] == [
        ("promotional", 4, 1, "active"),
        ("free", 3, 100, "active"),
    ]
    assert (found[0].lot_id, found[0].expires_at) == (
        granted.json()["lot_id"],
        granted.json()["expires_at"],
    )
    assert found[1].expires_at is None
    assert len(await client.lots(GOOGLE, who, include="all")) == 2
    with pytest.raises(NotFoundError):
        await client.lots(GOOGLE, user())


async def test_402_raises_purchase_required_with_the_offer(billing: InProcess) -> None:
    client, who = billing.client(), user()
    for _ in range(3):
        await client.charge(GOOGLE, who)
    check = await client.check(GOOGLE, who)
    assert (check.has_credit, check.purchase_required) == (False, True)
    assert (check.purchase_price_minor, check.purchase_uses) == (500, 20)

    with pytest.raises(PurchaseRequiredError) as refused:
        await client.charge(GOOGLE, who)
    error = refused.value
    assert (error.status, error.code) == (402, "purchase_required")
    assert error.offer == Offer(price_minor=500, uses=20, currency="USD")
    assert error.checkout_url is None or error.checkout_url.startswith("http")
    assert "No free uses" in error.detail
    assert len(billing.network.sent("/v1/billing/charges")) == 4, "a 402 is never retried"


async def test_a_lost_response_is_retried_under_the_same_key_and_counts_once(
    billing: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ciris_billing.client")
    client, who = billing.client(), user()
    billing.network.lose_responses = 1  # the app records the charge; its answer never arrives
    charge = await client.charge(GOOGLE, who, description="retried")
    assert charge.replayed is True
    sent = billing.network.sent("/v1/billing/charges")
    assert len(sent) == 2
    assert sent[0].headers["Idempotency-Key"] == sent[1].headers["Idempotency-Key"]
    assert sent[0].headers["Idempotency-Key"] == charge.idempotency_key
    assert len(events(caplog, "billing_request_retry")) == 1
    assert (await client.check(GOOGLE, who)).total_uses == 1

    # Each call is a new key: two calls are two uses.
    await client.charge(GOOGLE, who)
    await client.charge(GOOGLE, who)
    assert (await client.check(GOOGLE, who)).total_uses == 3


async def test_same_key_for_another_request_is_a_conflict(billing: InProcess) -> None:
    client, who = billing.client(), user()
    first = await client.charge(GOOGLE, who, idempotency_key="msg-001")
    again = await client.charge(GOOGLE, who, idempotency_key="msg-001")
    assert (again.replayed, again.charge_id) == (True, first.charge_id)
    with pytest.raises(IdempotencyConflictError) as conflict:
        await client.charge(GOOGLE, who, uses=2, idempotency_key="msg-001")
    assert conflict.value.status == 409


async def test_bad_key_is_an_authentication_error_not_retried(billing: InProcess) -> None:
    async with AsyncBillingClient(BASE, "cbk_not_a_key", transport=billing.network) as client:
        with pytest.raises(AuthenticationError) as unknown:
            await client.check(GOOGLE, user())
    assert unknown.value.status == 401
    assert len(billing.network.requests) == 1
    with pytest.raises(AuthenticationError) as scope:
        await billing.client("read").charge(GOOGLE, user())
    assert (scope.value.status, scope.value.code) == (403, "insufficient_scope")


async def test_retry_after_is_honoured_and_5xx_retried(billing: InProcess) -> None:
    client = billing.client(max_backoff=2.0)
    billing.network.proxy_errors = [
        httpx.Response(503, headers={"Retry-After": "1"}, json={"error": "busy", "detail": "x"}),
        httpx.Response(502, text="bad gateway"),
    ]
    started = time.monotonic()
    check = await client.check(GOOGLE, user())
    assert check.has_credit is True
    assert time.monotonic() - started >= 1.0
    assert len(billing.network.requests) == 3

    # A Retry-After longer than max_backoff ends the retries at once.
    billing.network.proxy_errors = [httpx.Response(503, headers={"Retry-After": "60"})]
    with pytest.raises(BillingUnavailableError) as unavailable:
        await client.check(GOOGLE, user())
    assert (unavailable.value.attempts, unavailable.value.status) == (1, 503)


async def test_purchase_paid_in_the_sandbox(billing: InProcess) -> None:
    client, who = billing.client(), user()
    bought = await client.purchase(GOOGLE, who, customer_email=who)
    assert bought.payment_id.startswith("pi_")
    assert bought.client_secret is not None
    assert (bought.amount_minor, bought.currency, bought.uses_purchased) == (500, "USD", 20)
    assert (bought.status, bought.succeeded, bought.publishable_key) == (
        "requires_payment_method",
        False,
        None,
    )
    assert bought.checkout_url is None or bought.checkout_url.startswith("http")
    assert bought.idempotency_key is not None
    again = await client.purchase(
        GOOGLE, who, customer_email=who, idempotency_key=bought.idempotency_key
    )
    assert again.payment_id == bought.payment_id

    paid = await billing.confirm(bought.payment_id, bought.client_secret)
    assert paid.json()["status"] == "succeeded"
    status = await client.purchase_status(bought.payment_id)
    assert (status.status, status.succeeded, status.credited) == ("succeeded", True, True)
    assert status.client_secret is None
    assert (await client.check(GOOGLE, who)).credits_remaining == 20
    with pytest.raises(NotFoundError):
        await client.purchase_status("pi_does_not_exist")


# -- in process: fail-open with the network down ---------------------------------------------


async def test_fail_open_queue_is_flushed_by_the_next_successful_call(
    billing: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ciris_billing.client")
    client, who = billing.client(fail_open_grace_seconds=60), user()
    billing.network.down = True
    check = await client.check(GOOGLE, who)
    assert (check.has_credit, check.degraded, check.total_uses) == (True, True, None)
    queued = [await client.charge(GOOGLE, who, description=f"turn {i}") for i in range(2)]
    assert all(c.pending and c.charge_id is None for c in queued)
    assert [c.idempotency_key for c in client.pending_charges] == [
        c.idempotency_key for c in queued
    ]
    assert len(events(caplog, "billing_fail_open_check")) == 1
    assert len(events(caplog, "billing_fail_open_charge_queued")) == 2

    billing.network.down = False
    assert (await client.check(GOOGLE, who)).degraded is False  # and flushes the outbox
    assert client.pending_charges == ()
    assert client.unreachable_for is None
    assert (await client.check(GOOGLE, who)).total_uses == 2
    assert len(events(caplog, "billing_pending_charge_recorded")) == 2
    assert (await client.flush_pending()).recorded == ()


async def test_concurrent_flushes_send_each_pending_charge_once(billing: InProcess) -> None:
    client, who = billing.client(fail_open_grace_seconds=60), user()
    billing.network.down = True
    await client.charge(GOOGLE, who)
    billing.network.down = False
    sent_while_down = len(billing.network.sent("/v1/billing/charges"))
    reports = await asyncio.gather(*(client.flush_pending() for _ in range(3)))
    assert sum(len(r.recorded) for r in reports) == 1
    assert len(billing.network.sent("/v1/billing/charges")) == sent_while_down + 1
    assert (await client.check(GOOGLE, who)).total_uses == 1


async def test_a_queued_charge_refused_when_flushed_is_dropped_and_logged(
    billing: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    client, who = billing.client(fail_open_grace_seconds=60), user()
    for _ in range(3):
        await client.charge(GOOGLE, who)
    billing.network.down = True
    assert (await client.check(GOOGLE, who)).has_credit is True  # degraded: not the truth
    await client.charge(GOOGLE, who)
    billing.network.down = False
    report = await client.flush_pending()
    assert (report.recorded, report.remaining) == ((), 0)
    assert len(report.dropped) == 1
    assert isinstance(report.dropped[0].error, PurchaseRequiredError)
    assert len(events(caplog, "billing_pending_charge_dropped")) == 1
    assert (await client.check(GOOGLE, who)).total_uses == 3


async def test_fail_open_ends_after_the_grace_period(
    billing: InProcess, caplog: pytest.LogCaptureFixture
) -> None:
    client = billing.client(fail_open_grace_seconds=0.3)
    billing.network.down = True
    assert (await client.check(GOOGLE, user())).degraded is True
    await asyncio.sleep(0.35)
    with pytest.raises(BillingUnavailableError):
        await client.check(GOOGLE, user())
    with pytest.raises(BillingUnavailableError):
        await client.charge(GOOGLE, user())
    assert client.pending_charges == ()
    assert len(events(caplog, "billing_fail_closed")) == 2


# -- a real server process --------------------------------------------------------------------


@pytest.fixture
def server(fresh_database: str, tmp_path: Path) -> Server:
    return new_server(fresh_database, tmp_path)


@pytest.mark.slow
async def test_retries_ride_out_a_restart(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ciris_billing.client")
    who = user()
    async with AsyncBillingClient(
        server.base, server.key, max_retries=600, backoff=0.05, max_backoff=0.2
    ) as client:
        with server.run("first"):
            assert (await client.charge(GOOGLE, who)).total_uses == 1
        # Stopped: the charge keeps retrying (same key) until the server is back on its port.
        charging = asyncio.create_task(client.charge(GOOGLE, who, description="across restart"))
        await asyncio.sleep(0.5)
        assert not charging.done()
        with contextlib.ExitStack() as stack:
            await asyncio.to_thread(stack.enter_context, server.run("second"))
            charge = await asyncio.wait_for(charging, timeout=60)
            assert (charge.total_uses, charge.description) == (2, "across restart")
            assert (await client.check(GOOGLE, who)).total_uses == 2
            await asyncio.to_thread(stack.close)
    assert len(events(caplog, "billing_request_retry")) >= 2


async def test_fail_closed_when_nothing_listens(server: Server) -> None:
    async with AsyncBillingClient(server.base, server.key, max_retries=2, **FAST) as client:
        for call in (
            lambda: client.check(GOOGLE, user()),
            lambda: client.charge(GOOGLE, user()),
            lambda: client.purchase(GOOGLE, user()),
        ):
            with pytest.raises(BillingUnavailableError) as unavailable:
                await call()
            assert (unavailable.value.attempts, unavailable.value.status) == (3, None)
            assert "ConnectError" in unavailable.value.detail
        assert client.pending_charges == ()


async def test_fail_open_while_down_then_flush_exactly_once(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    who = user()
    async with AsyncBillingClient(
        server.base, server.key, max_retries=1, fail_open_grace_seconds=60, **FAST
    ) as client:
        check = await client.check(GOOGLE, who)
        assert (check.has_credit, check.degraded) == (True, True)
        queued = await client.charge(GOOGLE, who, description="while down")
        assert queued.pending is True
        assert [c.idempotency_key for c in client.pending_charges] == [queued.idempotency_key]
        assert [r.levelno for r in events(caplog, "billing_fail_open_check")] == [logging.WARNING]
        assert len(events(caplog, "billing_fail_open_charge_queued")) == 1

        with server.run("up"):
            report = await client.flush_pending()
            assert (len(report.recorded), report.dropped, report.remaining) == (1, (), 0)
            assert report.recorded[0].idempotency_key == queued.idempotency_key
            assert (await client.check(GOOGLE, who)).total_uses == 1

            # Sending it again (the same key and request) replays; it never counts twice.
            replay = await client.charge(
                GOOGLE, who, description="while down", idempotency_key=queued.idempotency_key
            )
            assert replay.replayed is True
            assert (await client.flush_pending()).recorded == ()
            assert (await client.check(GOOGLE, who)).total_uses == 1
            page = await client.transactions(GOOGLE, who)
            assert [t.description for t in page.transactions if t.type == "charge"] == [
                "while down"
            ]


def test_sync_client(server: Server) -> None:
    who = user()
    with BillingClient(server.base, server.key, **FAST) as client, server.run("sync"):
        assert client.check(GOOGLE, who).free_uses_remaining == 3
        charges = [client.charge(GOOGLE, who, amount_minor=100) for _ in range(3)]
        assert [c.free_uses_remaining for c in charges] == [2, 1, 0]
        with pytest.raises(PurchaseRequiredError) as refused:
            client.charge(GOOGLE, who)
        assert refused.value.offer == Offer(500, 20, "USD")
        bought = client.purchase(GOOGLE, who)
        assert client.purchase_status(bought.payment_id).status == "requires_payment_method"
        assert client.transactions(GOOGLE, who).total == 4
    with BillingClient(server.base, server.key, max_retries=1, **FAST) as down:
        with pytest.raises(BillingUnavailableError):
            down.check(GOOGLE, who)
        opened = BillingClient(server.base, server.key, fail_open_grace_seconds=30, **FAST)
        with opened:
            assert opened.check(GOOGLE, who).degraded is True


def test_retry_after_header_forms() -> None:
    now = 1_000_000_000.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(" 0.5 ") == 0.5
    assert retry_after_seconds("nan") is None
    assert retry_after_seconds("soon") is None
    http_date = email.utils.formatdate(now + 7, usegmt=True)
    assert retry_after_seconds(http_date, now=lambda: now) == 7.0
    assert retry_after_seconds(email.utils.formatdate(now - 7, usegmt=True), lambda: now) == 0.0


def test_purchase_repr_hides_the_client_secret() -> None:
    purchase = parse_purchase(
        {
            "purchase_id": "p",
            "payment_id": "pi_1",
            "client_secret": "pi_1_secret_s3cr3t",
            "checkout_url": "https://billing.example.com/v1/billing/checkout/pi_1#cs=pi_1_secret_s3cr3t",
            "amount_minor": 500,
            "currency": "USD",
            "uses_purchased": 20,
            "status": "requires_payment_method",
            "provider": "sandbox",
            "a_field_from_the_future": {"x": 1},
        }
    )
    assert "s3cr3t" not in repr(purchase)
    assert purchase.checkout_url is not None
    assert purchase.checkout_url.endswith("s3cr3t")
    assert purchase.raw["a_field_from_the_future"] == {"x": 1}


async def test_the_check_after_a_charge_is_answered_from_the_charge(billing: InProcess) -> None:
    """Issue 26 item 3: the agent's loop (check, work, charge) sends the check once: a charge
    asks for the next check's answer (Prefer: next-check) and the client answers the user's
    next check from it, once, within check_reuse_seconds; a "no" is always asked again."""
    client, who = billing.client(), user()
    checks = "/v1/billing/credits/check"
    first = await client.check(GOOGLE, who)
    assert first.has_credit
    for turn in range(2):  # 3 free uses: two turns leave 1
        charge = await client.charge(GOOGLE, who)
        assert billing.network.sent("/v1/billing/charges")[-1].headers["Prefer"] == "next-check"
        assert charge.next_check is not None
        again = await client.check(GOOGLE, who)
        assert len(billing.network.sent(checks)) == 1  # answered from the charge
        assert again.free_uses_remaining == 2 - turn
        assert again == charge.next_check
    # Once only: the next check (no charge between) asks the service, and says the same.
    asked = await client.check(GOOGLE, who)
    assert len(billing.network.sent(checks)) == 2
    assert (asked.free_uses_remaining, asked.total_uses) == (1, 2)
    # The charge that empties the account: its "no" is not reused (the user may buy now).
    last = await client.charge(GOOGLE, who)
    assert last.next_check is not None
    assert last.next_check.purchase_required
    refused = await client.check(GOOGLE, who)
    assert len(billing.network.sent(checks)) == 3
    assert refused.purchase_required
    # check_reuse_seconds=0: every check asks.
    plain, other = billing.client(), user()
    plain._core.check_reuse_seconds = 0
    await plain.charge(GOOGLE, other)
    await plain.check(GOOGLE, other)
    assert [r for r in billing.network.sent(checks) if other in r.content.decode()]
