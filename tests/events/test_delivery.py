"""Delivering the outbox (events/delivery.py), in process with an injected clock: Standard
Webhooks signatures verified by a receiver on 127.0.0.1 as a consumer would, retries with
backoff while it is down, 3 days of retries, an endpoint disabled after 3 days failing,
rotation, filters, resend, timeouts and the SSRF guard at delivery time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from ciris_billing.db import events, utcnow, webhook_deliveries
from ciris_billing.events.delivery import RETRY_FOR, Deliveries, retry_delay, schedule
from tests.support.api import Api, identity
from tests.support.receiver import Receiver, receiving

BASE = "/v1/billing/webhook_endpoints"
USER = identity("hooked@example.com")


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with receiving() as found:
        yield found


async def endpoint(api: Api, receiver: Receiver, **body: Any) -> dict[str, Any]:
    created = await api.post(BASE, {"url": receiver.url, **body}, scope="admin")
    assert created.status_code == 201, created.text
    receiver.secret = created.json()["secret"]
    made: dict[str, Any] = created.json()
    return made


async def outbox_ids(api: Api, kinds: set[str] | None = None) -> set[str]:
    async with api.engine.connect() as conn:
        rows = await conn.execute(select(events.c.id, events.c.type))
        return {row.id for row in rows if kinds is None or row.type in kinds}


async def deliveries_of(api: Api, endpoint_id: str) -> list[dict[str, Any]]:
    listed = await api.get(f"{BASE}/{endpoint_id}/deliveries", scope="admin", limit=100)
    assert listed.status_code == 200, listed.text
    found: list[dict[str, Any]] = listed.json()["data"]
    return found


async def spend_everything(api: Api) -> None:
    # New here: on an app's own plan, so the default balance.low threshold applies (none on
    # `free`); an account made before keeps its plan.
    made = await api.post("/v1/billing/accounts", {**USER, "plan_name": "pro"}, scope="admin")
    assert made.status_code in (200, 201), made.text
    for _ in range(3):
        assert (await api.post("/v1/billing/charges", USER)).status_code == 201


async def test_every_event_is_delivered_signed_in_the_standard_format(
    hooks_api: Api, receiver: Receiver
) -> None:
    await endpoint(hooks_api, receiver)
    await spend_everything(hooks_api)
    report = await Deliveries(hooks_api.engine, hooks_api.settings).run_once()
    assert (report.dispatched, report.delivered) == (3, 3)
    assert receiver.rejected == []
    assert set(receiver.ids()) == await outbox_ids(hooks_api)
    first = receiver.received[0]
    assert first.signature.startswith("v1,")
    body = first.payload
    assert set(body) == {"type", "timestamp", "data"}
    assert body["type"] == "account.created"
    assert body["data"]["sequence"] == 1
    assert [r.payload["data"]["sequence"] for r in receiver.received] == [1, 2, 3]
    assert [r.payload["type"] for r in receiver.received] == [
        "account.created",
        "balance.low",
        "balance.depleted",
    ]
    # Nothing twice: a second run finds nothing to send.
    again = await Deliveries(hooks_api.engine, hooks_api.settings).run_once()
    assert (again.dispatched, again.delivered) == (0, 0)
    assert (await hooks_api.audit()).clean


async def test_a_receiver_down_for_a_while_gets_everything_once_it_is_back(
    hooks_api: Api, receiver: Receiver
) -> None:
    made = await endpoint(hooks_api, receiver)
    clock = Clock()
    deliveries = Deliveries(hooks_api.engine, hooks_api.settings, clock=clock)
    receiver.stop()  # down: connections refused
    await spend_everything(hooks_api)
    down = await deliveries.run_once()
    assert (down.dispatched, down.delivered) == (3, 0)
    listed = await deliveries_of(hooks_api, made["id"])
    assert {(d["status"], d["attempts"], d["last_error"]) for d in listed} == {
        ("pending", 1, "connect_error")
    }
    # Not due yet: the first retry waits 5 s.
    assert (await deliveries.run_once()).runs == []
    clock.advance(timedelta(seconds=5))
    assert sum(run.failed for run in (await deliveries.run_once()).runs) == 3  # still down
    receiver.start()
    clock.advance(timedelta(seconds=19))  # the second retry waits 20 s
    assert (await deliveries.run_once()).delivered == 0
    clock.advance(timedelta(seconds=1))
    assert (await deliveries.run_once()).delivered == 3
    assert set(receiver.ids()) == await outbox_ids(hooks_api)
    listed = await deliveries_of(hooks_api, made["id"])
    assert {(d["status"], d["attempts"]) for d in listed} == {("delivered", 3)}


async def test_non_2xx_and_timeouts_are_retried_with_the_same_webhook_id(
    hooks_api: Api, receiver: Receiver
) -> None:
    made = await endpoint(hooks_api, receiver, events=["account.created"])
    clock = Clock()
    settings = hooks_api.settings.model_copy(update={"webhook_timeout_seconds": 0.3})
    deliveries = Deliveries(hooks_api.engine, settings, clock=clock)
    await hooks_api.post("/v1/billing/accounts", USER)
    receiver.status = 500
    assert (await deliveries.run_once()).delivered == 0
    receiver.status, receiver.delay = 200, 1.0  # slower than the timeout
    clock.advance(timedelta(seconds=5))
    assert (await deliveries.run_once()).delivered == 0
    receiver.delay = 0
    clock.advance(timedelta(seconds=20))
    assert (await deliveries.run_once()).delivered == 1
    (delivery,) = await deliveries_of(hooks_api, made["id"])
    assert (delivery["status"], delivery["attempts"]) == ("delivered", 3)
    # Three attempts of one event, one webhook-id and the same body each time.
    assert len({(a.webhook_id, a.body) for a in receiver.attempts}) == 1
    assert len(receiver.attempts) == 3
    await deliveries.aclose()


def test_the_schedule_goes_from_seconds_to_minutes_to_hours_for_three_days() -> None:
    assert [retry_delay(n, 5) for n in (1, 2, 3, 4)] == [
        timedelta(seconds=5),
        timedelta(seconds=20),
        timedelta(seconds=80),
        timedelta(seconds=320),
    ]
    assert retry_delay(7, 5) > timedelta(hours=5)
    assert retry_delay(30, 5) == timedelta(hours=8)  # at most 8 h apart
    times = schedule(5)
    assert times[-1] >= RETRY_FOR
    assert times[-2] < RETRY_FOR


async def test_three_days_of_failures_give_up_and_disable_the_endpoint(
    hooks_api: Api, receiver: Receiver
) -> None:
    dead = await endpoint(hooks_api, receiver, events=["account.created"])
    with receiving() as watcher:  # a second endpoint, subscribed to everything
        await endpoint(hooks_api, watcher)
        receiver.stop()
        clock = Clock()
        deliveries = Deliveries(hooks_api.engine, hooks_api.settings, clock=clock)
        await hooks_api.post("/v1/billing/accounts", USER)
        await deliveries.run_once()
        attempts = 1
        while True:
            (delivery,) = await deliveries_of(hooks_api, dead["id"])
            if delivery["status"] != "pending":
                break
            clock.now = datetime.fromisoformat(delivery["next_attempt_at"])
            report = await deliveries.run_once()
            attempts += 1
            assert attempts < 40
            if any(run.disabled for run in report.runs):
                break
        (delivery,) = await deliveries_of(hooks_api, dead["id"])
        shown = (await hooks_api.get(f"{BASE}/{dead['id']}", scope="admin")).json()
        assert shown["status"] == "disabled"
        assert shown["disabled_reason"] == "failing for 3 days in a row"
        assert delivery["status"] == "failed"  # 3 days of retries are over
        assert delivery["attempts"] == attempts == len(schedule(5)) + 1
        await deliveries.run_once()  # the watcher hears of it
        kinds = [r.payload["type"] for r in watcher.received]
        assert kinds == ["account.created", "endpoint.disabled"]
        disabled = watcher.received[1].payload["data"]
        assert disabled["endpoint_id"] == dead["id"]
        assert "sequence" not in disabled  # about no account
        # Enabled again by an operator, a resend delivers it (same webhook-id).
        receiver.start()
        await hooks_api.post(f"{BASE}/{dead['id']}/enable", {}, scope="admin")
        resent = await hooks_api.post(
            f"{BASE}/{dead['id']}/deliveries/{delivery['id']}/resend", {}, scope="admin"
        )
        assert resent.status_code == 202
        assert (await deliveries.run_once()).delivered == 1
        assert receiver.ids() == [delivery["event_id"]]


async def test_a_rotated_secret_keeps_signing_beside_the_new_one_for_24_hours(
    hooks_api: Api, receiver: Receiver
) -> None:
    made = await endpoint(hooks_api, receiver)
    old = made["secret"]
    rotated = await hooks_api.post(f"{BASE}/{made['id']}/rotate_secret", {}, scope="admin")
    new = rotated.json()["secret"]
    receiver.secret = new
    clock = Clock()
    deliveries = Deliveries(hooks_api.engine, hooks_api.settings, clock=clock)
    await hooks_api.post("/v1/billing/accounts", USER)
    await deliveries.run_once()
    during = receiver.received[-1]
    assert len(during.signature.split(" ")) == 2
    headers = {
        "webhook-id": during.webhook_id,
        "webhook-timestamp": during.timestamp,
        "webhook-signature": during.signature,
    }
    Webhook(old).verify(during.body, headers)  # a receiver still on the old secret
    Webhook(new).verify(during.body, headers)
    clock.advance(timedelta(hours=24, seconds=1))
    await hooks_api.post("/v1/billing/accounts", identity("later@example.com"))
    await deliveries.run_once()
    after = receiver.received[-1]
    assert len(after.signature.split(" ")) == 1
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(
            after.body,
            {
                "webhook-id": after.webhook_id,
                "webhook-timestamp": str(int(utcnow().timestamp())),
                "webhook-signature": after.signature,
            },
        )


async def test_filters_and_disabled_endpoints(hooks_api: Api, receiver: Receiver) -> None:
    made = await endpoint(hooks_api, receiver, events=["balance.depleted"])
    await hooks_api.post(f"{BASE}/{made['id']}/disable", {}, scope="admin")
    await hooks_api.post("/v1/billing/accounts", USER)
    await Deliveries(hooks_api.engine, hooks_api.settings).run_once()
    await hooks_api.post(f"{BASE}/{made['id']}/enable", {}, scope="admin")
    await spend_everything(hooks_api)
    await Deliveries(hooks_api.engine, hooks_api.settings).run_once()
    # Only its type, and only what happened while it was enabled.
    assert [r.payload["type"] for r in receiver.received] == ["balance.depleted"]


async def test_the_ssrf_guard_runs_again_at_each_delivery(
    hooks_api: Api, receiver: Receiver
) -> None:
    made = await endpoint(hooks_api, receiver)  # created while private URLs were allowed
    await hooks_api.post("/v1/billing/accounts", USER)
    strict = hooks_api.settings.model_copy(update={"allow_private_webhook_urls": False})
    report = await Deliveries(hooks_api.engine, strict).run_once()
    assert report.delivered == 0
    assert receiver.attempts == []  # nothing was sent to 127.0.0.1
    (delivery,) = await deliveries_of(hooks_api, made["id"])
    assert (delivery["status"], delivery["last_error"]) == ("pending", "url_refused")
    async with hooks_api.engine.connect() as conn:
        attempts = await conn.scalar(select(webhook_deliveries.c.attempts))
    assert attempts == 1


async def test_endpoints_are_served_in_parallel(hooks_api: Api, receiver: Receiver) -> None:
    """The first endpoint answers only once the second has received its delivery: served one
    after the other, the first would time out (2 s) and nothing would be delivered to it."""
    with receiving() as second:
        await endpoint(hooks_api, receiver)
        await endpoint(hooks_api, second)
        receiver.wait_for = second.signal = threading.Event()
        await hooks_api.post("/v1/billing/accounts", USER)
        report = await Deliveries(hooks_api.engine, hooks_api.settings).run_once()
    assert report.delivered == 2
    assert receiver.ids() == second.ids()
