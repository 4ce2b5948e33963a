"""Checks and charges that queue up go out together (accounts/hot/lanes.py: reader.py,
writer.py), and each one's outcome is what it would have been alone. PostgreSQL only
(batching is how the hot path reaches it); one lane (DB_POOL_SIZE=1, or HOT_PATH_LANES=1),
so concurrent requests must queue and go out in batches. No free uses
(FREE_USES_PER_ACCOUNT=0): every account has exactly the paid uses it is given.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing.observability import BATCH_SIZE
from tests.support.api import Api, make_settings
from tests.support.postgres import truncate

CHARGES = "/v1/billing/charges"


# One lane by the pool's size (lanes never outnumber connections), or by HOT_PATH_LANES alone.
@pytest.fixture(params=[{"db_pool_size": 1}, {"hot_path_lanes": 1}], ids=["pool", "lanes"])
async def one_lane(postgres_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Api]:
    await truncate(postgres_url)
    settings = make_settings(
        postgres_url, free_uses_per_account=0, rate_limit_account_per_minute=60_000, **request.param
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        keys = {}
        async with app.state.billing.engine.begin() as conn:
            for scope in auth.SCOPES:
                keys[scope] = (await auth.create_key(conn, f"t-{scope}", frozenset({scope})))[1]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://b.test") as http:
            yield Api(http, app.state.billing.engine, keys, settings, app.state.billing)


def user(n: int | str) -> dict[str, Any]:
    return {"oauth_provider": "oauth:google", "external_id": f"batch-{n}@example.com"}


def batches_of_more_than_one(statement: str = "charge") -> float:
    """How many batches of more than one this process has sent so far (the histogram)."""
    buckets: dict[str, float] = {}
    for metric in BATCH_SIZE.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket") and sample.labels["statement"] == statement:
                buckets[sample.labels["le"]] = float(sample.value)
    return buckets["+Inf"] - buckets["1.0"]


async def test_each_charge_of_a_batch_gets_what_it_would_alone(one_lane: Api) -> None:
    # 20 accounts with 0..4 uses, 6 charges each, all at once.
    for n in range(20):
        created = await one_lane.post(
            "/v1/billing/accounts", {**user(n), "initial_balance_minor": n % 5}, scope="admin"
        )
        assert created.status_code == 201
    before = batches_of_more_than_one()

    answers = await asyncio.gather(
        *(
            one_lane.post(CHARGES, {**user(n), "description": f"c{i}"})
            for i in range(6)
            for n in range(20)
        )
    )

    assert batches_of_more_than_one() > before, "the charges went out in batches"
    made = Counter(a.json()["external_id"] for a in answers if a.status_code == 201)
    refused = Counter(a.status_code for a in answers if a.status_code != 201)
    assert set(refused) <= {402}
    for n in range(20):
        assert made.get(f"batch-{n}@example.com", 0) == n % 5, n
    # Each 201 reports its own account's balance after it: for one account, the remaining
    # counts are exactly n-1 .. 0, once each, and the charge ids are all different.
    for n in range(20):
        mine = [
            a.json()
            for a in answers
            if a.status_code == 201 and a.json()["external_id"] == f"batch-{n}@example.com"
        ]
        assert sorted(c["credits_remaining"] for c in mine) == list(range(n % 5))
        assert all(c["account_id"] == mine[0]["account_id"] for c in mine)
    ids = [a.json()["charge_id"] for a in answers if a.status_code == 201]
    assert len(set(ids)) == len(ids)
    report = await one_lane.audit()
    assert report.clean, report


async def test_refusals_and_new_accounts_inside_a_batch(one_lane: Api) -> None:
    await one_lane.post(
        "/v1/billing/accounts", {**user("suspended"), "initial_balance_minor": 5}, scope="admin"
    )
    suspended = await one_lane.post(
        "/v1/billing/accounts/oauth:google/batch-suspended@example.com/suspend",
        {"reason": "test"},
        scope="admin",
    )
    assert suspended.status_code == 200
    for n in range(10):
        await one_lane.post(
            "/v1/billing/accounts", {**user(f"paid-{n}"), "initial_balance_minor": 1}, scope="admin"
        )
    answers = await asyncio.gather(
        one_lane.post(CHARGES, user("suspended")),
        *(one_lane.post(CHARGES, user(f"new-{n}")) for n in range(5)),
        *(one_lane.post(CHARGES, user(f"paid-{n}")) for n in range(10)),
    )
    assert answers[0].status_code == 403
    assert [a.status_code for a in answers[1:6]] == [402] * 5  # created, with nothing to spend
    assert [a.status_code for a in answers[6:]] == [201] * 10
    report = await one_lane.audit()
    assert report.clean, report


async def test_a_retried_key_in_the_same_batch_is_charged_once(one_lane: Api) -> None:
    await one_lane.post(
        "/v1/billing/accounts", {**user("k"), "initial_balance_minor": 10}, scope="admin"
    )
    keyed = [one_lane.post(CHARGES, {**user("k"), "idempotency_key": "same"}) for _ in range(4)]
    for n in range(8):
        await one_lane.post(
            "/v1/billing/accounts",
            {**user(f"other-{n}"), "initial_balance_minor": 1},
            scope="admin",
        )
    others = [one_lane.post(CHARGES, user(f"other-{n}")) for n in range(8)]
    answers = await asyncio.gather(*keyed, *others)
    first = answers[:4]
    assert {a.status_code for a in first} == {201}
    assert len({a.json()["charge_id"] for a in first}) == 1, "one charge, replayed"
    assert {a.status_code for a in answers[4:]} == {201}
    ledger = await one_lane.get("/v1/billing/transactions", **user("k"))
    assert [t["type"] for t in ledger.json()["transactions"]].count("charge") == 1
    report = await one_lane.audit()
    assert report.clean, report


async def test_one_key_for_two_accounts_in_one_batch(one_lane: Api) -> None:
    """The batch breaks the unique key: its charges go again one by one, each answered alone —
    the first with its charge, the other with 409 (the key belongs to another request)."""
    for name in ("opener", "a", "b", *(f"more-{n}" for n in range(6))):
        await one_lane.post(
            "/v1/billing/accounts", {**user(name), "initial_balance_minor": 2}, scope="admin"
        )
    answers = await asyncio.gather(
        one_lane.post(CHARGES, user("opener")),  # takes the lane; the rest queue up together
        one_lane.post(CHARGES, {**user("a"), "idempotency_key": "shared"}),
        one_lane.post(CHARGES, {**user("b"), "idempotency_key": "shared"}),
        *(one_lane.post(CHARGES, user(f"more-{n}")) for n in range(6)),
    )
    statuses = [a.status_code for a in answers]
    assert sorted(statuses[1:3]) == [201, 409], statuses
    assert statuses[0] == 201, statuses
    assert statuses[3:] == [201] * 6, statuses
    report = await one_lane.audit()
    assert report.clean, report


async def test_each_check_of_a_batch_reads_its_own_account(one_lane: Api) -> None:
    for n in range(10):
        await one_lane.post(
            "/v1/billing/accounts", {**user(n), "initial_balance_minor": n}, scope="admin"
        )
    await one_lane.post("/v1/billing/accounts", user("suspended"))
    await one_lane.post(
        "/v1/billing/accounts/oauth:google/batch-suspended@example.com/suspend",
        {"reason": "test"},
        scope="admin",
    )
    before = batches_of_more_than_one("check")
    asked = [*range(10), *range(10), "new-1", "new-2", "new-1", "suspended"]
    answers = await asyncio.gather(
        *(one_lane.post("/v1/billing/credits/check", user(n), scope="read") for n in asked)
    )
    assert batches_of_more_than_one("check") > before, "the reads went out in batches"
    assert {a.status_code for a in answers} == {200}
    for n, answer in zip(asked, answers, strict=True):
        body = answer.json()
        if isinstance(n, int):
            assert (body["credits_remaining"], body["has_credit"]) == (n, n > 0), (n, body)
        elif n == "suspended":
            assert body["reason"] == "Account is suspended: test", body
        else:  # created on first sight, once, with no free uses here
            assert (body["credits_remaining"], body["purchase_required"]) == (0, True), body
    accounts = await one_lane.get("/v1/billing/accounts/oauth:google/batch-new-1@example.com")
    assert accounts.status_code == 200
    report = await one_lane.audit()
    assert report.clean, report


RESERVE = "/v1/billing/reservations"


async def test_keyed_holds_and_captures_that_queue_up_go_out_together(one_lane: Api) -> None:
    """The agent client sends every hold and capture with a key: those go out in batches too
    (hot/holds.py), each answer recorded with its key before the batch's one commit, so a retry
    replays it byte for byte; a key sent twice at once holds once."""
    for n in range(12):
        created = await one_lane.post(
            "/v1/billing/accounts", {**user(f"h{n}"), "initial_balance_minor": 3}, scope="admin"
        )
        assert created.status_code == 201
    holds_before, captures_before = (
        batches_of_more_than_one("hold"),
        batches_of_more_than_one("capture"),
    )

    def hold(n: int, key: str) -> Any:
        return one_lane.post(RESERVE, {**user(f"h{n}"), "uses": 2}, **{"Idempotency-Key": key})

    held = await asyncio.gather(
        *(hold(n, f"hold-{n}") for n in range(12)), hold(0, "hold-0"), hold(1, "hold-1")
    )
    assert batches_of_more_than_one("hold") > holds_before, "the keyed holds went out together"
    assert {a.status_code for a in held} == {201}
    # The twins (a key sent twice at once) made one hold each, answered alike.
    assert held[12].json() == held[0].json()
    assert held[13].json() == held[1].json()
    ids = [a.json()["reservation_id"] for a in held[:12]]
    assert len(set(ids)) == 12

    def capture(reservation_id: str, key: str) -> Any:
        path = f"{RESERVE}/{reservation_id}/capture"
        return one_lane.post(path, {"uses": 1}, **{"Idempotency-Key": key})

    captured = await asyncio.gather(*(capture(r, f"cap-{r}") for r in ids))
    assert batches_of_more_than_one("capture") > captures_before, "the captures went together"
    assert {a.status_code for a in captured} == {201}
    # Retried later, each key replays its first answer exactly; another key is refused.
    for n, reservation_id in enumerate(ids):
        again = await hold(n, f"hold-{n}")
        assert again.status_code == 201
        assert again.content == held[n].content
        replay = await capture(reservation_id, f"cap-{reservation_id}")
        assert replay.status_code == 201
        assert replay.content == captured[n].content
        assert (await capture(reservation_id, "another")).status_code == 409
    for n in range(12):
        account = await one_lane.get(f"/v1/billing/accounts/oauth:google/batch-h{n}@example.com")
        body = account.json()
        assert (body["credits_remaining"], body["held_uses"]) == (2, 0), body
    report = await one_lane.audit()
    assert report.clean, report
