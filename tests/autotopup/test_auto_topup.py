"""Auto top-up in process, on the sandbox: the card saved on the payment page, one top-up per
balance.low crossing, credited only by the webhook path, declines switching it off, the
monthly cap, 3-D Secure with a link, removing the card. The job's step is called directly
(`topups.run_once`: what the periodic job runs), so nothing here sleeps."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError

from ciris_billing.autotopup import topups
from ciris_billing.db import (
    auto_topup_settings,
    auto_topups,
    purchases,
    sandbox_payments,
    utcnow,
)
from ciris_billing.payments.providers.base import OffSessionPayment
from ciris_billing.payments.providers.sandbox import SandboxProvider
from ciris_billing.unit_of_work import unit_of_work
from ciris_billing.webhooks import inbox
from tests.support.api import Api, identity
from tests.support.cli import cli
from tests.support.events import events_of, types
from tests.support.servers import service_env

CARD = "4242424242424242"


def user() -> str:
    return f"topup-{uuid.uuid4().hex[:10]}@example.com"


async def buy_saving_card(api: Api, external_id: str, card: str = CARD) -> dict[str, Any]:
    """The payment page with the box ticked: the consent goes with the card's confirmation."""
    bought: dict[str, Any] = (await api.post("/v1/billing/purchases", identity(external_id))).json()
    payment_id, secret = bought["payment_id"], bought["client_secret"]
    paid = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
        json={"client_secret": secret, "card_number": card, "save_card": True},
    )
    assert paid.status_code == 200, paid.text
    return bought


async def settings_row(api: Api, external_id: str) -> Any:
    async with api.engine.connect() as conn:
        return (
            await conn.execute(
                text(
                    "SELECT s.* FROM auto_topup_settings s JOIN accounts a ON a.id = s.account_id "
                    "WHERE a.external_id = :e"
                ),
                {"e": external_id},
            )
        ).one()


async def charge(api: Api, external_id: str, times: int) -> None:
    for _ in range(times):
        response = await api.post("/v1/billing/charges", identity(external_id))
        assert response.status_code == 201, response.text


async def available(api: Api, external_id: str) -> int:
    body = await api.post("/v1/billing/credits/check", {**identity(external_id), "context": {}})
    found = body.json()
    return int(found["free_uses_remaining"]) + int(found["credits_remaining"])


async def drain_below_threshold(api: Api, external_id: str) -> None:
    """Charge until 2 uses are left (the default threshold is 3): one balance.low crossing."""
    await charge(api, external_id, await available(api, external_id) - 2)


async def grant(api: Api, external_id: str, uses: int) -> None:
    body = {**identity(external_id), "uses": uses, "reason": "test"}
    assert (await api.post("/v1/billing/credits", body, scope="admin")).status_code == 201


async def run_job(api: Api, **overrides: Any) -> topups.TopupReport:
    settings = api.settings.model_copy(update=overrides) if overrides else api.settings
    return await topups.run_once(api.engine, api.state.provider, api.state.pricing, settings)


async def deliver_stored_webhooks(api: Api) -> list[str]:
    """What the job queue's webhook retry does: handle every stored, unhandled event. (The
    sandbox sends a top-up's event before its purchase is recorded: it waits stored.)"""
    outcomes = []
    for event_id in await inbox.unhandled_event_ids(api.engine, "sandbox"):
        async with unit_of_work(api.engine) as work:
            outcomes.append((await inbox.handle(work, api.state.provider, event_id)).outcome)
    return outcomes


async def off_session_payments(api: Api) -> int:
    async with api.engine.connect() as conn:
        count = await conn.scalar(
            select(func.count()).select_from(sandbox_payments).where(sandbox_payments.c.off_session)
        )
    return int(count or 0)


def sandbox(api: Api) -> SandboxProvider:
    provider = api.state.provider
    assert isinstance(provider, SandboxProvider)
    return provider


async def test_the_payment_page_box_saves_the_card_and_switches_auto_topup_on(api: Api) -> None:
    who = user()
    await buy_saving_card(api, who)

    shown = await api.get(f"/v1/billing/accounts/oauth:google/{who}/auto_topup")
    assert shown.status_code == 200
    body = shown.json()
    assert body["enabled"] is True
    assert body["card_saved"] is True
    assert (body["card_brand"], body["card_last4"]) == ("visa", "4242")
    assert (body["uses_per_topup"], body["amount_minor"], body["currency"]) == (20, 500, "USD")
    assert (body["threshold_uses"], body["max_per_month"], body["topups_this_month"]) == (3, 10, 0)
    # Only the provider's ids, brand and last 4: no column anywhere holds the card number.
    async with api.engine.connect() as conn:
        dump = await conn.scalar(
            text("SELECT string_agg(t::text, ' ') FROM (SELECT * FROM auto_topup_settings) t")
        )
        sandbox_dump = await conn.scalar(
            text("SELECT string_agg(t::text, ' ') FROM (SELECT * FROM sandbox_payment_methods) t")
        )
    assert CARD not in (dump or "")
    assert CARD not in (sandbox_dump or "")


async def test_a_purchase_without_the_box_saves_no_card(api: Api) -> None:
    who = user()
    bought = (await api.post("/v1/billing/purchases", identity(who))).json()
    await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{bought['payment_id']}/confirm",
        json={"client_secret": bought["client_secret"], "card_number": CARD},
    )
    body = (await api.get(f"/v1/billing/accounts/oauth:google/{who}/auto_topup")).json()
    assert (body["enabled"], body["card_saved"]) == (False, False)
    refused = await api.http.put(
        f"/v1/billing/accounts/oauth:google/{who}/auto_topup",
        json={"enabled": True},
        headers=api.headers("write"),
    )
    assert refused.status_code == 409
    assert refused.json()["error"] == "auto_topup_needs_card"


async def test_a_crossing_pays_exactly_one_topup_credited_once_by_its_webhook(api: Api) -> None:
    who = user()
    await buy_saving_card(api, who)  # 3 free + 20 paid
    await drain_below_threshold(api, who)  # 2 left: balance.low
    assert types(await events_of(api.engine, who)).count("balance.low") == 1

    first = await run_job(api)
    again = await run_job(api)

    assert first.started == 1
    assert first.outcomes == {"processing": 1}
    assert again.started == 0
    assert not again.outcomes
    assert await off_session_payments(api) == 1
    # Not credited by the job: its webhook (stored, waiting for the purchase) credits it.
    assert await available(api, who) == 2
    assert "credited" in await deliver_stored_webhooks(api)
    assert await available(api, who) == 22
    assert await deliver_stored_webhooks(api) == []
    async with api.engine.connect() as conn:
        row = (await conn.execute(select(auto_topups))).one()
        purchase = (
            await conn.execute(select(purchases).where(purchases.c.id == row.purchase_id))
        ).one()
    assert (row.status, purchase.status, purchase.credited_at is not None) == (
        "succeeded",
        "succeeded",
        True,
    )
    found = types(await events_of(api.engine, who))
    assert found.count("auto_topup.succeeded") == 1
    assert found.count("purchase.succeeded") == 2  # the first pack, then the top-up
    assert (await run_job(api)).started == 0
    assert (await api.audit()).clean


async def test_crossings_decided_together_start_one_topup(api: Api) -> None:
    """Two job runs racing over one crossing: the unique crossing and the in-flight index."""
    who = user()
    await buy_saving_card(api, who)
    await drain_below_threshold(api, who)
    [due] = await topups.due_crossings(api.engine)

    decided = await asyncio.gather(
        *(topups.decide(api.engine, api.settings, due.account_id, due.event_id) for _ in range(8))
    )

    assert decided.count("started") == 1
    async with api.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(auto_topups)) == 1


async def test_two_top_ups_in_flight_are_impossible(api: Api) -> None:
    who = user()
    await buy_saving_card(api, who)
    row = await settings_row(api, who)
    now = utcnow()

    def pending(n: int) -> dict[str, Any]:
        return {
            "id": f"atu_{n}_{uuid.uuid4().hex[:8]}",
            "account_id": row.account_id,
            "crossing_event_id": f"evt_{uuid.uuid4().hex[:12]}",
            "status": "pending",
            "purchase_id": f"pur_{uuid.uuid4().hex[:12]}",
            "idempotency_key": uuid.uuid4().hex,
            "created_at": now,
            "updated_at": now,
        }

    async with api.engine.begin() as conn:
        await conn.execute(auto_topups.insert().values(pending(1)))
    with pytest.raises(IntegrityError):
        async with api.engine.begin() as conn:
            await conn.execute(auto_topups.insert().values(pending(2)))


async def test_a_lost_answer_is_found_not_paid_twice(api: Api) -> None:
    """The provider took the payment but its answer never reached us (a crash, a timeout):
    the next attempt asks the provider for it instead of paying again."""
    who = user()
    await buy_saving_card(api, who)
    await drain_below_threshold(api, who)
    [due] = await topups.due_crossings(api.engine)
    assert await topups.decide(api.engine, api.settings, due.account_id, due.event_id) == "started"
    async with api.engine.begin() as conn:
        topup = (await conn.execute(select(auto_topups))).one()
        # The first attempt, counted before its call; its answer is lost.
        await conn.execute(auto_topups.update().values(attempts=1))
    card = await settings_row(api, who)
    # (A new idempotency key: the sandbox would honour the same one, localstripe would not.)
    await sandbox(api).pay_off_session(
        OffSessionPayment(
            500,
            "USD",
            topup.purchase_id,
            topup.account_id,
            card.customer_id,
            card.payment_method_id,
            "lost-" + uuid.uuid4().hex,
        )
    )

    assert (
        await topups.pay(api.engine, api.state.provider, api.state.pricing, api.settings, topup.id)
        == "processing"
    )
    assert await off_session_payments(api) == 1
    await deliver_stored_webhooks(api)
    assert await available(api, who) == 22
    assert (await api.audit()).clean


async def test_a_declined_card_three_times_switches_auto_topup_off(
    api: Api, capfd: pytest.CaptureFixture[str]
) -> None:
    who = user()
    await buy_saving_card(api, who)
    card = await settings_row(api, who)
    await sandbox(api).set_card_behaviour(card.payment_method_id, "declined")

    for attempt in range(1, 4):
        await drain_below_threshold(api, who)
        report = await run_job(api)
        assert report.outcomes == {"failed": 1}, attempt
        await deliver_stored_webhooks(api)  # payment_failed: reported once all the same
        await grant(api, who, 10)  # back above the threshold: the next drop is a new crossing

    failures = [e for e in await events_of(api.engine, who) if e["type"] == "auto_topup.failed"]
    assert [e["data"]["consecutive_failures"] for e in failures] == [1, 2, 3]
    assert [e["data"]["auto_topup_enabled"] for e in failures] == [True, True, False]
    assert all(e["data"]["reason"] == "declined" for e in failures)
    body = (await api.get(f"/v1/billing/accounts/oauth:google/{who}/auto_topup")).json()
    assert (body["enabled"], body["card_saved"], body["disabled_reason"]) == (
        False,
        True,
        "3_consecutive_failures",
    )
    # Off: the next crossing pays nothing.
    await drain_below_threshold(api, who)
    assert (await run_job(api)).started == 0
    assert await off_session_payments(api) == 3
    assert (await api.audit()).clean
    logged = capfd.readouterr().out
    assert logged.count('"event": "auto_topup_failed"') == 3
    assert logged.count('"event": "auto_topup_disabled"') == 1


async def test_the_monthly_cap_is_respected(api: Api) -> None:
    who = user()
    await buy_saving_card(api, who)

    for _ in range(3):
        await drain_below_threshold(api, who)
        await run_job(api, auto_topup_max_per_month=2)
        await deliver_stored_webhooks(api)

    assert await off_session_payments(api) == 2
    async with api.engine.connect() as conn:
        statuses = list(await conn.scalars(select(auto_topups.c.status).order_by("created_at")))
        reasons = list(await conn.scalars(select(auto_topups.c.reason).order_by("created_at")))
    assert statuses == ["succeeded", "succeeded", "skipped"]
    assert reasons[-1] == "monthly_cap"
    capped = [e for e in await events_of(api.engine, who) if e["type"] == "auto_topup.failed"]
    assert [e["data"]["reason"] for e in capped] == ["monthly_cap"]
    body = (await api.get(f"/v1/billing/accounts/oauth:google/{who}/auto_topup")).json()
    assert (body["topups_this_month"], body["consecutive_failures"], body["enabled"]) == (
        2,
        0,
        True,
    )
    assert (await api.audit()).clean


async def test_requires_action_sends_a_link_that_completes_the_topup(api: Api) -> None:
    who = user()
    await buy_saving_card(api, who)
    card = await settings_row(api, who)
    await sandbox(api).set_card_behaviour(card.payment_method_id, "authentication_required")
    await drain_below_threshold(api, who)

    assert (await run_job(api)).outcomes == {"requires_action": 1}

    [event] = [
        e for e in await events_of(api.engine, who) if e["type"] == "auto_topup.requires_action"
    ]
    link = event["data"]["checkout_url"]
    payment_id = event["data"]["payment_id"]
    assert f"/v1/billing/checkout/{payment_id}#cs=" in link
    secret = link.split("#cs=", 1)[1]
    # The customer opens the link and authenticates: the normal webhook path credits it once.
    summary = await api.http.get(
        f"/v1/billing/checkout/{payment_id}/summary", headers={"X-Client-Secret": secret}
    )
    assert summary.json()["payment_status"] == "requires_action"
    done = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/authenticate",
        json={"client_secret": secret, "success": True},
    )
    assert done.status_code == 200
    await deliver_stored_webhooks(api)
    assert await available(api, who) == 22
    found = types(await events_of(api.engine, who))
    assert (found.count("auto_topup.requires_action"), found.count("auto_topup.succeeded")) == (
        1,
        1,
    )
    assert (await api.audit()).clean


async def test_removing_the_card_switches_auto_topup_off(api: Api) -> None:
    who = user()
    await buy_saving_card(api, who)
    path = f"/v1/billing/accounts/oauth:google/{who}/auto_topup"
    off = await api.http.put(path, json={"enabled": False}, headers=api.headers("write"))
    assert off.json()["enabled"] is False
    on = await api.http.put(path, json={"enabled": True}, headers=api.headers("write"))
    assert on.json()["enabled"] is True

    removed = await api.http.delete(path, headers=api.headers("write"))

    assert removed.status_code == 200
    body = removed.json()
    assert (body["enabled"], body["card_saved"], body["card_last4"]) == (False, False, None)
    async with api.engine.connect() as conn:
        attached = await conn.scalar(
            text("SELECT count(*) FROM sandbox_payment_methods WHERE attached_at IS NOT NULL")
        )
    assert attached == 0
    refused = await api.http.put(path, json={"enabled": True}, headers=api.headers("write"))
    assert refused.status_code == 409
    await drain_below_threshold(api, who)
    assert (await run_job(api)).started == 0
    async with api.engine.connect() as conn:
        assert (await conn.execute(select(auto_topup_settings))).one().enabled is False


async def test_the_cli_twins(api: Api) -> None:
    who = user()
    await buy_saving_card(api, who)
    env = service_env(api.database_url)

    def run(*args: str) -> Any:
        done = cli(env, "auto-topup", *args, f"oauth:google/{who}")
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    shown = run("show")
    assert (shown["enabled"], shown["card_last4"]) == (True, "4242")
    assert run("off")["enabled"] is False
    assert run("on")["enabled"] is True
    removed = run("remove-card")
    assert (removed["enabled"], removed["card_saved"]) == (False, False)
    refused = cli(env, "auto-topup", "on", f"oauth:google/{who}")
    assert refused.returncode == 1
    assert "auto_topup_needs_card" in refused.stderr


async def test_an_erased_account_forgets_its_card_and_is_never_topped_up(api: Api) -> None:
    who = user()
    await buy_saving_card(api, who)
    card = await settings_row(api, who)

    erased = await api.http.delete(
        f"/v1/billing/accounts/oauth:google/{who}", headers=api.headers("admin")
    )
    assert erased.status_code == 200, erased.text

    async with api.engine.connect() as conn:
        row = (
            await conn.execute(
                select(auto_topup_settings).where(
                    auto_topup_settings.c.account_id == card.account_id
                )
            )
        ).one()
    assert (row.enabled, row.payment_method_id, row.card_last4, row.disabled_reason) == (
        False,
        None,
        None,
        "account_erased",
    )
