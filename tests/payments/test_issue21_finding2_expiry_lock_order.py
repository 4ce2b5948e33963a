"""Issue 21 finding 2, left open: the expiry job locked an account's holds in its scan order
(creation), a dispute opening locks them by id, then the account: racing on one account they
could deadlock (one of them fails). Expiry now takes the dispute's order.

Each round: a pack bought (3 free + 20 paid), one hold of the 3 free uses, then 1-use holds of
paid uses; a third connection keeps one of them locked so the dispute opening (locking by id)
stops there while the expiry job's step starts; then both go on. No deadlock, `audit` clean.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.accounts import reservations as holds
from ciris_billing.db import accounts, create_engine, reservations, utcnow
from tests.payments.test_refunds_spare_reservations import RESERVE, dispute
from tests.support.api import Api, identity
from tests.support.flows import paid_purchase

ROUNDS = 4
PAID_HOLDS = 10


async def test_finding2_expiry_racing_a_dispute_opening_never_deadlocks(api: Api) -> None:
    # Its own connections: the app's small pool serves the dispute's request.
    engine = create_engine(api.database_url)
    try:
        for round_ in range(ROUNDS):
            await _round(api, engine, round_)
    finally:
        await engine.dispose()


async def _round(api: Api, engine: AsyncEngine, round_: int) -> None:
    user = identity(f"expiry-vs-dispute-{round_}@example.com")
    bought = await paid_purchase(api, user)
    created = [await _reserve(api, user, 3)]
    created += [await _reserve(api, user, 1) for _ in range(PAID_HOLDS)]
    first_paid, paid = created[1], sorted(created[1:])
    # The dispute stops at this hold: the first by id unless that is the first created.
    stop = paid[0] if paid[0] != first_paid else paid[1]
    async with engine.connect() as blocker:
        await blocker.begin()
        await blocker.execute(
            select(reservations.c.id).where(reservations.c.id == stop).with_for_update()
        )
        opening = asyncio.create_task(dispute(api, bought["payment_id"], "needs_response"))
        await _waiting_for_locks(engine, 1)
        expiring = asyncio.create_task(_expire(engine, user))
        await _waiting_for_locks(engine, 2)
        await blocker.commit()
    results = await asyncio.wait_for(asyncio.gather(opening, expiring, return_exceptions=True), 30)
    errors = [repr(result) for result in results if isinstance(result, BaseException)]
    assert errors == [], f"round {round_}: {errors}"
    assert results[1] == PAID_HOLDS + 1
    report = await api.audit()
    assert report.clean, report


async def _reserve(api: Api, user: dict[str, str], uses: int) -> str:
    held = await api.post(RESERVE, {**user, "uses": uses})
    assert held.status_code == 201, held.text
    reservation_id: str = held.json()["reservation_id"]
    return reservation_id


async def _expire(engine: AsyncEngine, user: dict[str, str]) -> int:
    """The expiry job's step for the user's account, as if its holds' TTL had passed."""
    async with engine.begin() as conn:
        account_id = await conn.scalar(
            select(accounts.c.id).where(accounts.c.external_id == user["external_id"])
        )
        assert account_id is not None
        return len(await holds.expire_account(conn, account_id, utcnow() + timedelta(days=2)))


async def _waiting_for_locks(engine: AsyncEngine, backends: int) -> None:
    for _ in range(200):
        # A fresh transaction each time: pg_stat_activity is a snapshot per transaction.
        async with engine.connect() as watcher:
            waiting: Any = await watcher.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        if int(waiting) >= backends:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {backends} backends ever waited for a lock")
