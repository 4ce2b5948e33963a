"""The agent client's holds: `async with billing.reserve(...) as hold: ... await hold.capture(n)`.

Against the real app in process (behind `Network`, which can drop answers or be down) and, for
the blocking twin, a real server process. Every test ends with the ledger audited.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from ciris_billing.audit import audit
from ciris_billing_client import (
    BillingClient,
    BillingUnavailableError,
    Offer,
    PurchaseRequiredError,
    ReservationExpiredError,
    ReservationNotHeldError,
)
from tests.support.agent import (
    BASE,
    FAST,
    GOOGLE,
    InProcess,
    Network,
    Server,
    events,
    new_server,
    serving,
    user,
)

RESERVATIONS = "/v1/billing/reservations"


class Held(InProcess):
    """The app in process, with a way to audit its ledger."""

    audit_url: str = ""

    async def audit_clean(self) -> None:
        engine = create_async_engine(self.audit_url)
        try:
            async with engine.connect() as conn:
                report = await audit(conn)
        finally:
            await engine.dispose()
        assert report.clean, report


@pytest.fixture
async def billing(database_url: str) -> AsyncIterator[Held]:
    async with serving(database_url, Held) as served:
        served.audit_url = database_url
        yield served


@pytest.fixture
def server(fresh_database: str, tmp_path: Path) -> Server:
    return new_server(fresh_database, tmp_path)


def captures(network: Network) -> list[httpx.Request]:
    return [r for r in network.requests if r.url.path.endswith("/capture")]


def releases(network: Network) -> list[httpx.Request]:
    return [r for r in network.requests if r.url.path.endswith("/release")]


class Boom(Exception):
    pass


# -- the block --------------------------------------------------------------------------------


async def test_capture_part_of_a_hold_charges_once_and_gives_the_rest_back(
    billing: Held,
) -> None:
    client, who = billing.client(), user()
    async with client.reserve(GOOGLE, who, uses=3, ttl=120, metadata={"job": "j-1"}) as hold:
        assert (hold.status, hold.uses, hold.held_uses) == ("held", 3, 3)
        assert (hold.free_uses_remaining, hold.credits_remaining) == (0, 0)
        assert hold.reservation_id.startswith("rsv_")
        assert hold.expires_at.endswith(("Z", "+00:00"))
        check = await client.check(GOOGLE, who)
        assert (check.has_credit, check.held_uses) == (False, 3)
        charge = await hold.capture(2, "two steps", {"model": "m-1"})
        assert (charge.uses, charge.released_uses, charge.reservation_id) == (
            2,
            1,
            hold.reservation_id,
        )
        assert (charge.free_uses_used, charge.free_uses_remaining, charge.held_uses) == (2, 1, 0)
        assert (charge.description, dict(charge.metadata)) == (
            "two steps",
            {"job": "j-1", "model": "m-1"},
        )
        assert charge.idempotency_key == hold.capture_key
    assert (hold.status, hold.charge) == ("captured", charge)
    assert releases(billing.network) == [], "a captured hold is not released on exit"

    check = await client.check(GOOGLE, who)
    assert (check.total_uses, check.free_uses_remaining, check.held_uses) == (2, 1, 0)
    assert (await client.reservation(hold.reservation_id)).status == "captured"
    page = await client.transactions(GOOGLE, who)
    assert [t.description for t in page.transactions if t.type == "charge"] == ["two steps"]
    await billing.audit_clean()


async def test_an_exception_in_the_block_releases_the_hold(
    billing: Held, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ciris_billing.client")
    client, who = billing.client(), user()
    hold = client.reserve(GOOGLE, who, uses=2)

    async def interaction() -> None:
        async with hold:
            assert (await client.check(GOOGLE, who)).free_uses_remaining == 1
            raise Boom("the agent crashed")

    with pytest.raises(Boom):
        await interaction()
    assert hold.status == "released"
    assert len(releases(billing.network)) == 1
    assert captures(billing.network) == []
    assert (await client.reservation(hold.reservation_id)).status == "released"
    check = await client.check(GOOGLE, who)
    assert (check.free_uses_remaining, check.held_uses, check.total_uses) == (3, 0, 0)
    assert [r.billing_fields for r in events(caplog, "billing_hold_released")] == [  # type: ignore[attr-defined]
        {"reservation_id": hold.reservation_id, "because": "exception"}
    ]
    await billing.audit_clean()


async def test_a_cancelled_interaction_releases_its_hold(billing: Held) -> None:
    client, who = billing.client(), user()
    entered = asyncio.Event()
    hold = client.reserve(GOOGLE, who, uses=3)

    async def interaction() -> None:
        async with hold:
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(interaction())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hold.status == "released"
    assert (await client.check(GOOGLE, who)).free_uses_remaining == 3
    await billing.audit_clean()


async def test_leaving_the_block_without_capture_releases_the_hold(billing: Held) -> None:
    client, who = billing.client(), user()
    async with client.reserve(GOOGLE, who, uses=3) as hold:
        assert (await client.check(GOOGLE, who)).has_credit is False
    assert hold.status == "released"
    assert (len(releases(billing.network)), captures(billing.network)) == (1, [])
    page = await client.reservations(GOOGLE, who)
    assert [(r.reservation_id, r.status) for r in page.reservations] == [
        (hold.reservation_id, "released")
    ]
    check = await client.check(GOOGLE, who)
    assert (check.has_credit, check.free_uses_remaining, check.held_uses) == (True, 3, 0)

    # Released by hand inside: the exit has nothing left to do.
    async with client.reserve(GOOGLE, who) as again:
        released = await again.release()
        assert (released.status, released.held_uses) == ("released", 0)
        with pytest.raises(ReservationNotHeldError) as gone:
            await again.capture()
        assert (gone.value.status, gone.value.code) == (409, "reservation_not_held")
    assert len(releases(billing.network)) == 2
    await billing.audit_clean()


async def test_lost_answers_are_retried_under_the_same_keys_one_hold_one_charge(
    billing: Held,
) -> None:
    client, who = billing.client(), user()
    billing.network.lose_responses = 1  # the hold is made; its answer never arrives
    async with client.reserve(GOOGLE, who, uses=2) as hold:
        assert hold.reservation.replayed is True
        billing.network.lose_responses = 1  # the capture is made; its answer never arrives
        charge = await hold.capture(1, "retried")
        assert charge.replayed is True
        # capture() again (same arguments): the same key, so the same one charge.
        again = await hold.capture(1, "retried")
        assert (again.replayed, again.charge_id) == (True, charge.charge_id)

    reserves = billing.network.sent(RESERVATIONS)
    assert len(reserves) == 2
    assert {r.headers["Idempotency-Key"] for r in reserves} == {hold.idempotency_key}
    assert uuid.UUID(hold.idempotency_key).version == 4
    assert len(captures(billing.network)) == 3
    assert {r.headers["Idempotency-Key"] for r in captures(billing.network)} == {hold.capture_key}
    assert hold.capture_key != hold.idempotency_key

    assert len((await client.reservations(GOOGLE, who)).reservations) == 1
    check = await client.check(GOOGLE, who)
    assert (check.total_uses, check.free_uses_remaining, check.held_uses) == (1, 2, 0)
    page = await client.transactions(GOOGLE, who)
    assert [t.description for t in page.transactions if t.type == "charge"] == ["retried"]
    await billing.audit_clean()


async def test_a_capture_whose_outcome_is_unknown_is_sent_again_at_exit(billing: Held) -> None:
    client, who = billing.client(), user()
    async with client.reserve(GOOGLE, who, uses=3) as hold:
        billing.network.lose_responses = 4  # made on the first attempt; all 4 answers lost
        with pytest.raises(BillingUnavailableError):
            await hold.capture(2)
        assert hold.status == "held"  # as far as this client knows
    # The exit sent it again under the same key: replayed, charged once, nothing released.
    assert hold.status == "captured"
    assert hold.charge is not None
    assert hold.charge.replayed is True
    assert len(captures(billing.network)) == 5
    assert releases(billing.network) == []
    check = await client.check(GOOGLE, who)
    assert (check.total_uses, check.free_uses_remaining, check.held_uses) == (2, 1, 0)

    # Billing down for the capture: nothing was made; the exit makes it (once).
    async with client.reserve(GOOGLE, who) as down:
        billing.network.down = True
        with pytest.raises(BillingUnavailableError):
            await down.capture(description="sent at exit")
        billing.network.down = False
    assert down.charge is not None
    assert down.charge.replayed is False
    assert (await client.check(GOOGLE, who)).total_uses == 3
    await billing.audit_clean()


async def test_a_refused_hold_raises_purchase_required_with_the_checkout_url(
    billing: Held,
) -> None:
    client, who = billing.client(), user()
    ran = False
    with pytest.raises(PurchaseRequiredError) as refused:
        async with client.reserve(GOOGLE, who, uses=4):
            ran = True
    assert ran is False
    error = refused.value
    assert (error.status, error.code) == (402, "purchase_required")
    assert error.offer == Offer(price_minor=500, uses=20, currency="USD")
    assert error.checkout_url is not None
    assert error.checkout_url.startswith("http")
    assert "/v1/billing/buy/" in error.checkout_url  # the signed buy link
    assert len(billing.network.sent(RESERVATIONS)) == 1, "a 402 is never retried"

    # The same refusal as a charge's, once the uses are spent.
    for _ in range(3):
        await client.charge(GOOGLE, who)
    with pytest.raises(PurchaseRequiredError) as charge_refused:
        await client.charge(GOOGLE, who)
    with pytest.raises(PurchaseRequiredError) as hold_refused:
        async with client.reserve(GOOGLE, who):
            pass
    assert hold_refused.value.offer == charge_refused.value.offer
    for link in (hold_refused.value.checkout_url, charge_refused.value.checkout_url):
        assert link is not None
        assert "/v1/billing/buy/" in link
    assert (hold_refused.value.code, hold_refused.value.detail) == (
        charge_refused.value.code,
        charge_refused.value.detail,
    )
    await billing.audit_clean()


async def test_capture_after_expiry_raises_and_the_exit_releases(billing: Held) -> None:
    client, who = billing.client(), user()
    async with client.reserve(GOOGLE, who, uses=2, ttl=1) as hold:
        await asyncio.sleep(1.2)
        with pytest.raises(ReservationExpiredError) as late:
            await hold.capture()
        assert (late.value.status, late.value.code) == (409, "reservation_expired")
    assert hold.status in ("released", "expired")
    assert hold.charge is None
    check = await client.check(GOOGLE, who)
    assert (check.total_uses, check.free_uses_remaining, check.held_uses) == (0, 3, 0)
    await billing.audit_clean()


async def test_many_blocks_at_once_never_hold_more_than_there_is(billing: Held) -> None:
    client, who = billing.client(), user()

    async def interaction() -> str:
        try:
            async with client.reserve(GOOGLE, who) as hold:
                await asyncio.sleep(0.05)
                await hold.capture()
        except PurchaseRequiredError:
            return "refused"
        return "captured"

    outcomes = await asyncio.gather(*(interaction() for _ in range(8)))
    assert outcomes.count("captured") + outcomes.count("refused") == 8
    assert 1 <= outcomes.count("captured") <= 3
    check = await client.check(GOOGLE, who)
    assert check.total_uses == outcomes.count("captured")
    assert check.held_uses == 0
    await billing.audit_clean()


async def test_a_block_is_entered_once_and_read_after_entering(billing: Held) -> None:
    hold = billing.client().reserve(GOOGLE, user())
    assert hold.status == "new"
    with pytest.raises(RuntimeError):
        _ = hold.reservation_id
    async with hold:
        with pytest.raises(RuntimeError):
            async with hold:
                pass
    assert hold.status == "released"
    await billing.audit_clean()


# -- the blocking twin, against a real server ------------------------------------------------


def test_sync_reserve_block(server: Server) -> None:
    who, broke = user(), user()
    with BillingClient(server.base, server.key, **FAST) as client, server.run("holds"):
        with client.reserve(GOOGLE, who, uses=3, ttl=120) as hold:
            assert (hold.status, hold.held_uses, hold.free_uses_remaining) == ("held", 3, 0)
            charge = hold.capture(2, "sync turn")
            assert (charge.uses, charge.released_uses) == (2, 1)
        assert hold.status == "captured"

        with pytest.raises(Boom), client.reserve(GOOGLE, who) as failed:
            raise Boom("the agent crashed")
        assert failed.status == "released"

        with client.reserve(GOOGLE, who) as idle:
            pass
        assert idle.status == "released"

        check = client.check(GOOGLE, who)
        assert (check.total_uses, check.free_uses_remaining, check.held_uses) == (2, 1, 0)
        assert [r.status for r in client.reservations(GOOGLE, who).reservations] == [
            "released",
            "released",
            "captured",
        ]

        with pytest.raises(PurchaseRequiredError) as refused, client.reserve(GOOGLE, broke, uses=9):
            pass
        assert refused.value.checkout_url is not None
        assert refused.value.offer == Offer(500, 20, "USD")
    assert asyncio.run(_audit(server)) is True


async def _audit(server: Server) -> bool:
    engine = create_async_engine(server.env["DATABASE_URL"])
    try:
        async with engine.connect() as conn:
            return (await audit(conn)).clean
    finally:
        await engine.dispose()


async def test_a_hold_by_a_carry_feature_is_captured_by_quantity(billing: Held) -> None:
    """Holds by feature (issue 24): the client sends feature and quantity; a `carry` hold is
    captured by the units the work used, the carry making them uses."""
    rate = {"feature": "tokens", "units_per_use": 1000, "rounding": "carry"}
    async with httpx.AsyncClient(transport=billing.network.app, base_url=BASE) as http:
        made = await http.post(
            "/v1/billing/rates", json=rate, headers={"X-API-Key": billing.keys["admin"]}
        )
        assert made.status_code == 200, made.text
    client, who = billing.client(), user()
    async with client.reserve(GOOGLE, who, feature="tokens", quantity=2500) as hold:
        assert hold.uses == 3  # what 2,500 tokens can complete, whatever is carried
        charge = await hold.capture(quantity=1200)
        assert (charge.uses, charge.released_uses) == (1, 2)
        assert (charge.feature, charge.quantity) == ("tokens", 1200)
    async with client.reserve(GOOGLE, who, feature="tokens", quantity=900) as hold:
        charge = await hold.capture(quantity=700)  # 200 carried + 700: no use completed
        assert (charge.uses, charge.released_uses) == (0, 1)
    await billing.audit_clean()
