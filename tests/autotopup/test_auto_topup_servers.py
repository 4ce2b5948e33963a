"""Auto top-up through `ciris-billing serve --workers 2` with its job queue running, on the
sandbox and on Stripe (localstripe): an account with a saved card is drained by 50 concurrent
charges; its balance crosses below the threshold once, so exactly one off-session payment is
made, credited once by its webhook; `ciris-billing audit` is clean."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from ciris_billing.db import auto_topups, create_engine, credits, events, sandbox_payments
from tests.support.cli import cli, create_key
from tests.support.localstripe import (
    CARD_DECLINED_AT_CHARGE,
    CARD_SUCCEEDS,
    LocalStripe,
    run_localstripe,
)
from tests.support.servers import free_port, running_service, service_env
from tests.support.stripe_stack import WEBHOOK_SECRET, stripe_env

pytestmark = [
    pytest.mark.slow,  # real service processes (2 workers), localstripe
    pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning"),
]

USER = {"oauth_provider": "oauth:google", "external_id": "auto-topup-mp@example.com"}
ACCOUNT_PATH = "/v1/billing/accounts/oauth:google/auto-topup-mp@example.com/auto_topup"
WAIT_SECONDS = 90.0
CARD_ALWAYS_AUTHENTICATES = "4000002760003184"
# Fast job ticks (the default is 10 s), and room for the floods.
JOB_ENV = {
    "JOBS_ENABLED": "true",
    "JOBS_POLL_SECONDS": "1",
    "RATE_LIMIT_KEY_PER_SECOND": "0",
    "RATE_LIMIT_ACCOUNT_PER_MINUTE": "0",
}


def wait_for(what: str, probe: Any) -> Any:
    """Poll `probe` until it returns something truthy (bounded: WAIT_SECONDS)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def save_card(base: str, key: str, pay: Any) -> None:
    """Buy the pack on the payment page with the box ticked; `pay(payment)` pays it."""
    headers = {"X-API-Key": key}
    bought = httpx.post(f"{base}/v1/billing/purchases", json=USER, headers=headers, timeout=30)
    assert bought.status_code == 201, bought.text
    payment = bought.json()
    pay(payment)  # with the payer's consent to keep the card
    settings = wait_for(
        "the saved card",
        lambda: (
            body
            if (body := httpx.get(base + ACCOUNT_PATH, headers=headers, timeout=30).json())[
                "enabled"
            ]
            else None
        ),
    )
    assert (settings["card_brand"], settings["card_last4"]) == ("visa", "4242")


async def drain_with_50_concurrent_charges(base: str, key: str) -> list[int]:
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=60) as http:
        # 3 free + 20 paid + 27 granted = 50: the 50 charges take them all, whenever the
        # top-up lands (so the balance crosses below 3 exactly once).
        granted = await http.post(
            "/v1/billing/credits", json={**USER, "uses": 27, "reason": "acceptance"}
        )
        assert granted.status_code == 201, granted.text
        answers = await asyncio.gather(
            *(http.post("/v1/billing/charges", json=USER) for _ in range(50))
        )
    return [r.status_code for r in answers]


def report_delay(drained: float) -> None:
    """A figure, not an assertion: from the drained balance to the top-up's uses credited
    (the job's tick, the provider, the webhook; JOBS_POLL_SECONDS=1)."""
    print(f"\nauto top-up credited {time.monotonic() - drained:.1f} s after the drain")


def available(base: str, key: str) -> int:
    body = httpx.post(
        f"{base}/v1/billing/credits/check",
        json={**USER, "context": {}},
        headers={"X-API-Key": key},
        timeout=30,
    ).json()
    return int(body["free_uses_remaining"]) + int(body["credits_remaining"])


async def outbox_and_topups(database_url: str) -> tuple[list[str], list[Any], int]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            types = list(await conn.scalars(select(events.c.type).order_by(events.c.created_at)))
            rows = list(await conn.execute(select(auto_topups)))
            credited = 0
            for row in rows:
                credited += int(
                    await conn.scalar(
                        select(func.count())
                        .select_from(credits)
                        .where(credits.c.external_transaction_id == row.payment_id)
                    )
                    or 0
                )
    finally:
        await engine.dispose()
    return types, rows, credited


def assert_one_topup_credited_once(
    database_url: str, env: dict[str, str], statuses: list[int]
) -> Any:
    assert statuses.count(201) == 50, sorted(set(statuses))
    types, rows, credited = asyncio.run(outbox_and_topups(database_url))
    assert len(rows) == 1
    [topup] = rows
    assert topup.status == "succeeded"
    assert credited == 1
    assert types.count("balance.low") == 1
    assert types.count("auto_topup.succeeded") == 1
    assert "auto_topup.failed" not in types
    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "clean" in audited.stdout, audited.stdout
    return topup


def test_sandbox_50_concurrent_charges_make_exactly_one_topup(
    fresh_database: str, tmp_path: Path
) -> None:
    port = free_port()
    env = service_env(fresh_database, PUBLIC_BASE_URL=f"http://127.0.0.1:{port}", **JOB_ENV)
    key = create_key(env, "admin")
    with running_service(env, tmp_path / "server.log", workers=2, port=port) as base:

        def pay(payment: dict[str, Any]) -> None:
            paid = httpx.post(
                f"{base}/v1/billing/sandbox/payment_intents/{payment['payment_id']}/confirm",
                json={
                    "client_secret": payment["client_secret"],
                    "card_number": CARD_SUCCEEDS,
                    "save_card": True,
                },
                timeout=30,
            )
            assert paid.status_code == 200, paid.text

        save_card(base, key, pay)
        statuses = asyncio.run(drain_with_50_concurrent_charges(base, key))
        drained = time.monotonic()
        wait_for("the top-up's credit", lambda: available(base, key) == 20)
        report_delay(drained)

    assert_one_topup_credited_once(fresh_database, env, statuses)

    async def off_session_payments() -> int:
        engine = create_engine(fresh_database)
        async with engine.connect() as conn:
            count = await conn.scalar(
                select(func.count())
                .select_from(sandbox_payments)
                .where(sandbox_payments.c.off_session)
            )
        await engine.dispose()
        return int(count or 0)

    assert asyncio.run(off_session_payments()) == 1
    logs = (tmp_path / "server.log").read_text()
    assert CARD_SUCCEEDS not in logs


@pytest.fixture
def localstripe(tmp_path: Path) -> Iterator[LocalStripe]:
    with run_localstripe(tmp_path / "localstripe") as server:
        yield server


def test_stripe_50_concurrent_charges_make_exactly_one_topup(
    fresh_database: str, tmp_path: Path, localstripe: LocalStripe
) -> None:
    port = free_port()
    env = {
        **stripe_env(fresh_database, localstripe.base_url),
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        **JOB_ENV,
    }
    key = create_key(env, "admin")
    with running_service(env, tmp_path / "server.log", workers=2, port=port) as base:
        localstripe.register_webhook(f"{base}/v1/billing/webhooks/stripe", WEBHOOK_SECRET)

        def pay(payment: dict[str, Any]) -> None:
            # The browser (Stripe.js): a card payment method, then confirm.
            method = localstripe.create_card_payment_method(CARD_SUCCEEDS)
            paid = localstripe.pay(payment["payment_id"], method, save_card=True)
            assert paid["status"] == "succeeded"

        save_card(base, key, pay)
        statuses = asyncio.run(drain_with_50_concurrent_charges(base, key))
        drained = time.monotonic()
        wait_for("the top-up's credit", lambda: available(base, key) == 20)
        report_delay(drained)

    topup = assert_one_topup_credited_once(fresh_database, env, statuses)
    intent = localstripe.retrieve(topup.payment_id)
    assert (intent["status"], intent["amount"], intent["currency"]) == ("succeeded", 500, "usd")
    assert intent["metadata"]["ciris_purchase_id"] == topup.purchase_id
    # The customer's payments at Stripe: the pack bought on the page, and one top-up.
    listed = httpx.get(
        f"{localstripe.base_url}/v1/payment_intents",
        params={"customer": intent["customer"], "limit": 100},
        headers={"Authorization": f"Bearer {localstripe.api_key}"},
        timeout=10,
    ).json()["data"]
    assert len(listed) == 2


async def event_data(database_url: str, event_type: str) -> list[dict[str, Any]]:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.scalars(
                select(events.c.data).where(events.c.type == event_type).order_by(events.c.sequence)
            )
            return [dict(row) for row in rows]
    finally:
        await engine.dispose()


def test_stripe_declined_three_times_switches_off_then_requires_action_sends_a_link(
    fresh_database: str, tmp_path: Path, localstripe: LocalStripe
) -> None:
    port = free_port()
    public = f"http://127.0.0.1:{port}"
    env = {**stripe_env(fresh_database, localstripe.base_url), "PUBLIC_BASE_URL": public, **JOB_ENV}
    key = create_key(env, "admin")
    headers = {"X-API-Key": key}
    with running_service(env, tmp_path / "server.log", workers=2, port=port) as base:
        localstripe.register_webhook(f"{base}/v1/billing/webhooks/stripe", WEBHOOK_SECRET)
        method = localstripe.create_card_payment_method(CARD_SUCCEEDS)
        save_card(
            base,
            key,
            lambda payment: localstripe.pay(payment["payment_id"], method, save_card=True),
        )

        def cross_below_threshold() -> None:
            granted = httpx.post(
                f"{base}/v1/billing/credits",
                json={**USER, "uses": 10, "reason": "acceptance"},
                headers=headers,
                timeout=30,
            )
            assert granted.status_code == 201, granted.text
            for _ in range(available(base, key) - 2):
                charged = httpx.post(
                    f"{base}/v1/billing/charges", json=USER, headers=headers, timeout=30
                )
                assert charged.status_code == 201, charged.text

        # The bank starts declining the saved card: three crossings, three failures, off.
        localstripe.swap_card(method, CARD_DECLINED_AT_CHARGE)
        for failures in (1, 2, 3):
            cross_below_threshold()
            wait_for(
                f"failure {failures}",
                lambda n=failures: (
                    len(asyncio.run(event_data(fresh_database, "auto_topup.failed"))) == n
                ),
            )
        failed = asyncio.run(event_data(fresh_database, "auto_topup.failed"))
        assert [e["consecutive_failures"] for e in failed] == [1, 2, 3]
        assert [e["auto_topup_enabled"] for e in failed] == [True, True, False]
        shown = httpx.get(base + ACCOUNT_PATH, headers=headers, timeout=30).json()
        assert (shown["enabled"], shown["disabled_reason"]) == (False, "3_consecutive_failures")

        # Back on, now the bank wants 3-D Secure: an event with the payment page's link.
        localstripe.swap_card(method, CARD_ALWAYS_AUTHENTICATES)
        on = httpx.put(base + ACCOUNT_PATH, json={"enabled": True}, headers=headers, timeout=30)
        assert on.json()["enabled"] is True
        cross_below_threshold()
        [action] = wait_for(
            "auto_topup.requires_action",
            lambda: asyncio.run(event_data(fresh_database, "auto_topup.requires_action")),
        )
        link = action["checkout_url"]
        assert link.startswith(f"{public}/v1/billing/checkout/{action['payment_id']}#cs=")
        secret = link.split("#cs=", 1)[1]
        summary = httpx.get(
            f"{base}/v1/billing/checkout/{action['payment_id']}/summary",
            headers={"X-Client-Secret": secret},
            timeout=30,
        )
        assert summary.status_code == 200
        # The customer authenticates on the page: credited by the webhook, once.
        localstripe.authenticate(action["payment_id"], secret, True)
        wait_for(
            "auto_topup.succeeded",
            lambda: asyncio.run(event_data(fresh_database, "auto_topup.succeeded")),
        )
        assert available(base, key) == 22
        logs = (tmp_path / "server.log").read_text()
    assert logs.count('"event": "auto_topup_disabled"') == 1
    assert secret not in logs
    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
