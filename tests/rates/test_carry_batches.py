"""Rated charges that queue up go out batched (hot/lanes.py): plain, `up`, `carry` below one
use and `carry` in one batch, each through its own texts, each as if alone."""

from __future__ import annotations

from ciris_billing.accounts.hot.lanes import Waiting
from ciris_billing.accounts.hot.writer import ChargeAttempt
from ciris_billing.db import new_id, utcnow
from tests.rates.test_rated_charges import TOKENS, carried, paid_account, set_rate
from tests.support.api import Api, identity


def attempt(user: dict[str, str], **rated: object) -> ChargeAttempt:
    return ChargeAttempt(
        oauth_provider=user["oauth_provider"],
        external_id=user["external_id"],
        uses=int(rated.pop("uses", 1)),  # type: ignore[call-overload]
        amount_minor=0,
        currency="USD",
        description=None,
        metadata_json="{}",
        idempotency_key=None,
        fingerprint=None,
        charge_id=new_id("ch"),
        at=utcnow(),
        api_key_id="k",
        **rated,  # type: ignore[arg-type]
    )


async def test_a_mixed_batch_charges_each_as_if_alone(api: Api) -> None:
    await set_rate(api, TOKENS, 1000, "carry")
    users = [identity(f"batch-{n}@example.com") for n in range(6)]
    for user in users:
        await paid_account(api, user, 10)
    # users[2] carries 900 already: its 300 below one use completes one.
    made = await api.post("/v1/billing/charges", {**users[2], "feature": TOKENS, "quantity": 900})
    assert made.json()["uses"] == 0
    carry = {"rated": "carry", "feature": TOKENS, "units_per_use": 1000}
    attempts = [
        attempt(users[0]),  # plain, 1 use
        attempt(users[1], **carry, quantity=300),  # carry, 0 uses
        attempt(users[2], **carry, quantity=300),  # carry, 900 + 300: 1 use
        attempt(users[3], **carry, quantity=2500),  # carry, 2 uses, 500 kept
        attempt(users[4], rated="up", feature="x", quantity=2500, uses=3),  # up, 3 uses
        attempt(users[5], **carry, quantity=40_000),  # carry, 40 uses: not enough -> no row
    ]
    batch = [Waiting((a.oauth_provider, a.external_id), a) for a in attempts]
    await api.state.charge_store._send_many(batch)
    rows = [await waiting.answer for waiting in batch]
    assert [None if row is None else int(row.get("uses", 1)) for row in rows] == [
        1,
        0,
        1,
        2,
        3,
        None,
    ]
    assert await carried(api, users[1]) == {TOKENS: 300}
    assert await carried(api, users[2]) == {TOKENS: 200}
    assert await carried(api, users[3]) == {TOKENS: 500}
    assert await carried(api, users[5]) == {}
    assert (await api.audit()).clean
