"""Issue 21, finding 1: one bad member never fails a batch's other members.

A capture whose statement failed (its hold's metadata held a NUL, which the `::jsonb` merge
refuses) used to fail the whole batch it queued in: 11 clean captures of other accounts stayed
held and expired unbilled. Now, when a batch's statement fails, whatever the error, each member
is sent again alone (accounts/hot/lanes.py Lanes._alone) and only the bad one fails.

The edge now refuses such text (tests/api/test_finding21_strict_input.py), so the bad member is
handed to the store directly, as the edge no longer lets it in: a real failure in PostgreSQL
(text with NUL, which no text column accepts), no mocks. One lane (DB_POOL_SIZE=1), so
concurrent requests queue and go out in batches.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa

from ciris_billing import auth
from ciris_billing.accounts.hot.holds import CaptureAttempt, HoldAttempt
from ciris_billing.accounts.hot.writer import ChargeAttempt
from ciris_billing.app import create_app
from ciris_billing.db import new_id, utcnow
from tests.accounts.test_batches import batches_of_more_than_one
from tests.support.api import Api, make_settings
from tests.support.postgres import truncate

RESERVE = "/v1/billing/reservations"
CHARGES = "/v1/billing/charges"
CLEAN = 11  # as in the report: 11 clean captures of other accounts
BAD = "a\x00b"  # NUL: no PostgreSQL text column takes it


@pytest.fixture
async def one_lane(postgres_url: str) -> AsyncIterator[tuple[Api, str]]:
    await truncate(postgres_url)
    settings = make_settings(
        postgres_url, db_pool_size=1, free_uses_per_account=0, rate_limit_account_per_minute=60_000
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        keys, ids = {}, {}
        async with app.state.billing.engine.begin() as conn:
            for scope in auth.SCOPES:
                ids[scope], keys[scope] = await auth.create_key(
                    conn, f"t-{scope}", frozenset({scope})
                )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b.test") as http:
            api = Api(http, app.state.billing.engine, keys, settings, app.state.billing)
            yield api, ids["write"]


def user(n: int) -> dict[str, str]:
    return {"oauth_provider": "oauth:google", "external_id": f"isolated-{n}@example.com"}


async def _accounts(api: Api, count: int) -> None:
    for n in range(count):
        made = await api.post(
            "/v1/billing/accounts", {**user(n), "initial_balance_minor": 5}, scope="admin"
        )
        assert made.status_code == 201, made.text


async def _until(condition: Any) -> None:
    for _ in range(3000):  # at most 15 s
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the requests did not queue")


async def _one_batch(
    api: Api, store: Any, lock: tuple[str, str], clean: list[Any], bad: Any
) -> list[Any]:
    """The first clean request in the one lane, waiting for its row (held by `lock`, a SELECT
    ... FOR UPDATE in another transaction, until all have queued); the other clean ones, then
    the bad one, queued behind it: they go out in one batch. Their answers, the bad one's
    last."""
    # Its own connection: the app's pools have one each (DB_POOL_SIZE=1).
    locker = await asyncpg.connect(api.database_url.replace("+asyncpg", ""))
    try:
        async with locker.transaction():
            await locker.execute(*lock)
            tasks = [asyncio.ensure_future(clean[0])]
            await _until(lambda: store._busy == 1)  # the first is in the one lane, on the lock
            tasks += [asyncio.ensure_future(call) for call in clean[1:]]
            await _until(lambda: len(store._waiting) == len(clean) - 1)
            tasks.append(asyncio.ensure_future(bad))
            await _until(lambda: len(store._waiting) == len(clean))
    finally:
        await locker.close()
    return list(await asyncio.gather(*tasks, return_exceptions=True))


async def test_finding1_a_bad_capture_fails_alone_not_its_batch(one_lane: tuple[Api, str]) -> None:
    api, key_id = one_lane
    await _accounts(api, CLEAN + 1)
    holds = []
    for n in range(CLEAN + 1):
        held = await api.post(RESERVE, {**user(n), "uses": 1})
        assert held.status_code == 201, held.text
        holds.append(held.json()["reservation_id"])
    bad = CaptureAttempt(
        reservation_id=holds[CLEAN],
        uses=None,
        charge_id=new_id("ch"),
        at=utcnow(),
        amount_minor=0,
        description=BAD,
        metadata_json="{}",
        api_key_id=key_id,
        credit_id=new_id("cr"),
    )
    before = batches_of_more_than_one("capture")

    answers = await _one_batch(
        api,
        api.state.capture_store,
        ("SELECT 1 FROM reservations WHERE id = $1 FOR UPDATE", holds[0]),
        [api.post(f"{RESERVE}/{h}/capture", {}) for h in holds[:CLEAN]],
        api.state.capture_store.capture(bad),
    )

    assert batches_of_more_than_one("capture") > before, "the captures went out in a batch"
    assert isinstance(answers.pop(), Exception), "the bad capture failed (alone)"
    assert [a.status_code for a in answers] == [201] * CLEAN, [a.text for a in answers]
    left = await api.get(RESERVE, status="held", **user(CLEAN))
    assert [r["reservation_id"] for r in left.json()["reservations"]] == [holds[CLEAN]]
    assert (await api.audit()).clean


async def test_finding1_a_bad_hold_fails_alone_not_its_batch(one_lane: tuple[Api, str]) -> None:
    api, key_id = one_lane
    await _accounts(api, CLEAN + 1)
    now = utcnow()
    bad = HoldAttempt(
        oauth_provider=user(CLEAN)["oauth_provider"],
        external_id=user(CLEAN)["external_id"],
        uses=1,
        reservation_id=new_id("rsv"),
        api_key_id=key_id,
        metadata_json='{"k": "' + BAD + '"}',
        at=now,
        expires_at=now + timedelta(minutes=5),
    )
    before = batches_of_more_than_one("hold")

    answers = await _one_batch(
        api,
        api.state.hold_store,
        ("SELECT 1 FROM accounts WHERE external_id = $1 FOR UPDATE", user(0)["external_id"]),
        [api.post(RESERVE, {**user(n), "uses": 1}) for n in range(CLEAN)],
        api.state.hold_store.hold(bad),
    )

    assert batches_of_more_than_one("hold") > before, "the holds went out in a batch"
    assert isinstance(answers.pop(), Exception), "the bad hold failed (alone)"
    assert [a.status_code for a in answers] == [201] * CLEAN, [a.text for a in answers]
    assert (await api.audit()).clean


async def test_finding1_a_bad_charge_fails_alone_not_its_batch(one_lane: tuple[Api, str]) -> None:
    api, key_id = one_lane
    await _accounts(api, CLEAN + 1)
    bad = ChargeAttempt(
        oauth_provider=user(CLEAN)["oauth_provider"],
        external_id=user(CLEAN)["external_id"],
        uses=1,
        amount_minor=0,
        currency="USD",
        description=BAD,
        metadata_json="{}",
        idempotency_key=None,
        fingerprint=None,
        charge_id=new_id("ch"),
        at=utcnow(),
        api_key_id=key_id,
    )
    before = batches_of_more_than_one("charge")

    answers = await _one_batch(
        api,
        api.state.charge_store,
        ("SELECT 1 FROM accounts WHERE external_id = $1 FOR UPDATE", user(0)["external_id"]),
        [api.post(CHARGES, user(n)) for n in range(CLEAN)],
        api.state.charge_store.charge(bad),
    )

    assert batches_of_more_than_one("charge") > before, "the charges went out in a batch"
    assert isinstance(answers.pop(), Exception), "the bad charge failed (alone)"
    assert [a.status_code for a in answers] == [201] * CLEAN, [a.text for a in answers]
    async with api.engine.connect() as conn:
        spent = await conn.scalar(sa.text("SELECT count(*) FROM charges"))
    assert spent == CLEAN
    assert (await api.audit()).clean
