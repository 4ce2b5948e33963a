"""The consumption order (issue 23, item 2): over random mixes of lots (priority, expiry, kind,
age), every charge takes exactly what a Python reference sorted by rules.consumption_key takes;
and 200 concurrent charges across lots are exact."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from ciris_billing.db import charges
from ciris_billing.ledger.wallet import NewLot
from tests.ledger.support import (
    account_row,
    account_with,
    books_problems,
    charge,
    random_mix,
    reference_lots,
    reference_take,
)
from tests.support.api import Api

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)


async def test_fifty_random_mixes_are_consumed_in_the_rules_order(api: Api) -> None:
    rng = random.Random(2026)
    for case in range(50):
        name = f"mix-{case}"
        mix = random_mix(rng, NOW, lots_at_most=6)
        account_id = await account_with(api.engine, name, mix, NOW - timedelta(days=1))
        ordered = await reference_lots(api.engine, account_id)
        wallet = await account_row(api.engine, account_id)
        # The wallet keeps the lots in the rule's order.
        assert list(wallet.lot_ids) == [lot.id for lot in ordered], case
        step = 0
        while True:
            uses = rng.randint(1, 3)
            at = NOW + timedelta(minutes=rng.choice([0, 30, 90]) + step)
            step += 1
            expected = reference_take(ordered, uses, at)
            made = await api.state.charge_store.charge(charge(name, uses, at))
            if expected is None:
                assert made is None, (case, step)
                break
            assert made is not None, (case, step)
            taken = list(zip(made["lot_ids"], made["lot_uses"], strict=True))
            assert taken == expected, (case, step, mix)
    assert await books_problems(api.engine) == []


async def test_two_hundred_concurrent_charges_across_lots_are_exact(api: Api) -> None:
    later = NOW + timedelta(days=3650)
    mix = [
        NewLot(kind="free", uses=3, source="free_grant"),
        NewLot(kind="promotional", uses=10, source="grant", priority=50, expires_at=later),
        NewLot(kind="paid", uses=12, source="purchase", amount_minor=1200),
        NewLot(kind="paid", uses=20, source="purchase", amount_minor=1500),
    ]  # 45 uses each
    names = [f"crowd-{n}" for n in range(4)]
    ids = [await account_with(api.engine, name, mix, NOW) for name in names]

    async def one(name: str) -> int:
        who = {"oauth_provider": "oauth:google", "external_id": f"{name}@ledger.example"}
        answer = await api.post("/v1/billing/charges", who)
        return answer.status_code

    statuses = await asyncio.gather(*(one(names[n % 4]) for n in range(200)))
    assert statuses.count(201) == 4 * 45
    assert statuses.count(402) == 200 - 4 * 45
    async with api.engine.connect() as conn:
        rows = list(await conn.execute(select(charges.c.account_id, charges.c.lot_uses)))
    assert len(rows) == 180
    assert all(sum(row.lot_uses) == 1 for row in rows)
    for account_id in ids:
        wallet = await account_row(api.engine, account_id)
        assert list(wallet.lot_left) == [0, 0, 0, 0]
        assert (wallet.free_uses_remaining, wallet.paid_uses_remaining) == (0, 0)
        assert wallet.total_uses == 45
    assert await books_problems(api.engine) == []
