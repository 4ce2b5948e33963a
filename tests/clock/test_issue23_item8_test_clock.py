"""Issue 23 item 8: the sandbox's test clock. `POST /v1/billing/test_clock/advance` moves the
installation's "now" forward for every time rule (a 1-hour hold expires without waiting, a
portal link past its lifetime is refused, events and charges carry the new time), audited and
idempotent; `GET /v1/billing/test_clock` shows it; with Stripe both are 404 and the clock is
never offset. The CLI twin does the same from the terminal.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError

from ciris_billing import audit_trail, clock
from ciris_billing.db import accounts, events
from ciris_billing.jobs import Recovery
from ciris_billing.testclock.store import MAX_ADVANCE_SECONDS
from tests.support.api import Api, identity, make_settings, running_app
from tests.support.cli import cli
from tests.support.servers import service_env

CLOCK = "/v1/billing/test_clock"
ADVANCE = f"{CLOCK}/advance"
RESERVE = "/v1/billing/reservations"
DAY = 86_400


@pytest.fixture(autouse=True)
def real_time_after() -> Iterator[None]:
    """The CLI runs in this process: whatever it read, the next test starts on real time."""
    yield
    clock.set_offset(0)


def who() -> dict[str, str]:
    return identity(f"clock-{uuid.uuid4().hex[:10]}@example.com")


def at(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def real_now() -> datetime:
    return datetime.now(UTC)


async def advance(api: Api, seconds: int, **headers: str) -> httpx.Response:
    return await api.post(ADVANCE, {"seconds": seconds}, scope="admin", **headers)


async def test_the_clock_starts_at_the_real_time(api: Api) -> None:
    shown = await api.get(CLOCK)
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["offset_seconds"] == 0
    assert body["sandbox"] is True
    assert abs((at(body["now"]) - real_now()).total_seconds()) < 5
    assert at(body["now"]).utcoffset() == timedelta(0)


async def test_advance_moves_now_forward_and_get_shows_it(api: Api) -> None:
    moved = await advance(api, 3 * DAY)
    assert moved.status_code == 200, moved.text
    assert moved.json()["offset_seconds"] == 3 * DAY
    again = await advance(api, 60)
    assert again.json()["offset_seconds"] == 3 * DAY + 60
    body = (await api.get(CLOCK)).json()
    assert body["offset_seconds"] == 3 * DAY + 60
    ahead = (at(body["now"]) - real_now()).total_seconds()
    assert 3 * DAY + 55 < ahead < 3 * DAY + 65
    assert (await api.audit()).clean


async def test_a_one_hour_hold_expires_without_waiting(api: Api) -> None:
    user = who()
    held = await api.post(RESERVE, {**user, "uses": 2, "ttl_seconds": 3600})
    assert held.status_code == 201, held.text
    hold_id = held.json()["reservation_id"]
    assert (await advance(api, 3601)).status_code == 200

    # Refused by the clock at once, whether or not the job has run.
    late = await api.post(f"{RESERVE}/{hold_id}/capture", {})
    assert late.status_code == 409, late.text
    assert late.json()["error"] == "reservation_expired"
    # The expiry job releases it by the same clock.
    report = await Recovery(api.settings, api.engine, api.state.provider).run_once()
    assert report.expired == 1
    shown = (await api.get(f"{RESERVE}/{hold_id}")).json()
    assert shown["status"] == "expired"
    check = (await api.post("/v1/billing/credits/check", user, scope="read")).json()
    assert check["held_uses"] == 0
    assert (await api.audit()).clean


async def test_a_hold_within_its_ttl_still_captures(api: Api) -> None:
    user = who()
    held = await api.post(RESERVE, {**user, "uses": 1, "ttl_seconds": 3600})
    assert (await advance(api, 3500)).status_code == 200
    captured = await api.post(f"{RESERVE}/{held.json()['reservation_id']}/capture", {})
    assert captured.status_code == 201, captured.text
    assert (await api.audit()).clean


async def test_a_portal_link_past_its_lifetime_is_refused(api: Api) -> None:
    user = who()
    check = (await api.post("/v1/billing/credits/check", user, scope="read")).json()
    link = httpx.URL(check["portal_url"]).path
    assert (await api.http.get(link)).status_code == 200
    assert (await advance(api, api.settings.portal_link_seconds - 60)).status_code == 200
    assert (await api.http.get(link)).status_code == 200
    assert (await advance(api, 120)).status_code == 200
    gone = await api.http.get(link)
    assert gone.status_code == 410
    assert "This link has expired" in gone.text
    # A link made now, on the moved clock, opens (the revocation time is on the same clock).
    fresh = (await api.post("/v1/billing/credits/check", user, scope="read")).json()
    assert (await api.http.get(httpx.URL(fresh["portal_url"]).path)).status_code == 200


async def test_events_charges_and_accounts_carry_the_moved_time(api: Api) -> None:
    user = who()
    assert (await api.post("/v1/billing/accounts", user)).status_code == 201
    assert (await advance(api, 31 * DAY)).status_code == 200
    charged = await api.post("/v1/billing/charges", user)
    assert charged.status_code == 201, charged.text
    ahead = at(charged.json()["created_at"]) - real_now()
    assert timedelta(days=31, seconds=-30) < ahead < timedelta(days=31, seconds=30)
    for _ in range(2):  # the last free use: balance.depleted, an event on the moved clock
        assert (await api.post("/v1/billing/charges", user)).status_code == 201
    later = await api.post("/v1/billing/accounts", who())
    assert at(later.json()["created_at"]) - real_now() > timedelta(days=31, seconds=-30)

    async with api.engine.connect() as conn:
        times = [
            row.created_at
            for row in await conn.execute(
                select(events.c.created_at)
                .join(accounts, accounts.c.id == events.c.account_id)
                .where(accounts.c.external_id == user["external_id"])
                .order_by(events.c.sequence)
            )
        ]
    assert len(times) >= 2, times
    first, last = times[0], times[-1]
    assert abs((first - real_now()).total_seconds()) < 60  # account.created, before
    assert last - real_now() > timedelta(days=31, seconds=-30)  # balance.depleted, after
    assert (await api.audit()).clean


async def test_an_advance_is_in_the_audit_trail(api: Api) -> None:
    assert (await advance(api, 7 * DAY)).status_code == 200
    async with api.engine.connect() as conn:
        rows = await audit_trail.entries(conn, action="test_clock_advance")
    assert len(rows) == 1
    row = rows[0]
    assert (row.door, row.actor, row.account_id) == ("api", "test-admin", None)
    assert row.detail == {"seconds": 7 * DAY}
    assert row.before == {"offset_seconds": 0}
    assert row.after == {"offset_seconds": 7 * DAY}


async def test_an_idempotency_key_replays_the_advance_once(api: Api) -> None:
    key = f"k-{uuid.uuid4().hex}"
    first = await advance(api, 600, **{"Idempotency-Key": key})
    again = await advance(api, 600, **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 200
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == first.json()
    other = await advance(api, 1200, **{"Idempotency-Key": key})
    assert other.status_code == 409
    assert other.json()["error"] == "idempotency_key_reused"
    assert (await api.get(CLOCK)).json()["offset_seconds"] == 600
    async with api.engine.connect() as conn:
        assert len(await audit_trail.entries(conn, action="test_clock_advance")) == 1


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"seconds": 0},
        {"seconds": -60},
        {"seconds": "60"},
        {"seconds": 1.5},
        {"seconds": None},
        {"seconds": MAX_ADVANCE_SECONDS + 1},
        {"seconds": 60, "days": 1},
    ],
)
async def test_strict_input_is_422(api: Api, body: dict[str, Any]) -> None:
    refused = await api.post(ADVANCE, body, scope="admin")
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"] == "validation_error"
    assert (await api.get(CLOCK)).json()["offset_seconds"] == 0


async def test_only_an_admin_key_advances(api: Api) -> None:
    refused = await api.post(ADVANCE, {"seconds": 60}, scope="write")
    assert refused.status_code == 403
    assert (await api.http.get(CLOCK)).status_code == 401
    assert (await api.get(CLOCK, scope="read")).status_code == 200


async def test_backwards_is_impossible_and_the_total_is_bounded(api: Api) -> None:
    with pytest.raises(IntegrityError):
        async with api.engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO test_clock VALUES (1, -1, :at)"), {"at": real_now()}
            )
    for _ in range(10):
        assert (await advance(api, MAX_ADVANCE_SECONDS)).status_code == 200
    over = await advance(api, 1)
    assert over.status_code == 422, over.text
    assert (await api.get(CLOCK)).json()["offset_seconds"] == 10 * MAX_ADVANCE_SECONDS


async def test_with_stripe_it_is_404_and_the_clock_is_never_offset(database_url: str) -> None:
    async with running_app(make_settings(database_url)) as sandbox:
        assert (await advance(sandbox, DAY)).status_code == 200
    settings = make_settings(
        database_url,
        payment_provider="stripe",
        stripe_api_key="sk_test_not_called",
        stripe_webhook_secret="whsec_not_called",
        stripe_publishable_key="pk_test_not_called",
        stripe_api_base="http://127.0.0.1:9",
    )
    async with running_app(settings) as api:
        assert clock.offset_seconds() == 0  # the row says a day; Stripe never reads it
        for response in (
            await api.get(CLOCK),
            await advance(api, 60),
        ):
            assert response.status_code == 404, response.text
            assert response.json()["error"] == "sandbox_inactive"
        user = who()
        made = await api.post("/v1/billing/accounts", user)
        assert abs((at(made.json()["created_at"]) - real_now()).total_seconds()) < 60
    async with running_app(make_settings(database_url)) as sandbox:
        assert (await sandbox.get(CLOCK)).json()["offset_seconds"] == DAY


async def test_the_cli_shows_and_advances_and_refuses_with_stripe(api: Api) -> None:
    env = service_env(api.database_url)
    moved = cli(env, "test-clock", "advance", "--days", "2")
    assert moved.returncode == 0, moved.stderr
    assert '"offset_seconds": 172800' in moved.stdout
    shown = cli(env, "test-clock", "show")
    assert shown.returncode == 0, shown.stderr
    assert '"offset_seconds": 172800' in shown.stdout
    assert (await api.get(CLOCK)).json()["offset_seconds"] == 2 * DAY  # the app saw it
    async with api.engine.connect() as conn:
        rows = await audit_trail.entries(conn, action="test_clock_advance")
    assert [(row.door, row.detail) for row in rows] == [("cli", {"seconds": 2 * DAY})]
    assert cli(env, "test-clock", "advance").returncode != 0  # neither --seconds nor --days

    stripe = {
        **env,
        "PAYMENT_PROVIDER": "stripe",
        "STRIPE_API_KEY": "sk_test_not_called",
        "STRIPE_WEBHOOK_SECRET": "whsec_not_called",
        "STRIPE_PUBLISHABLE_KEY": "pk_test_not_called",
    }
    for args in (("show",), ("advance", "--seconds", "60")):
        refused = cli(stripe, "test-clock", *args)
        assert refused.returncode != 0
        assert "sandbox_inactive" in refused.stderr
    assert (await api.get(CLOCK)).json()["offset_seconds"] == 2 * DAY
