"""Issue 22 item 3, "Deliveries are one at a time per endpoint": ~2.4 deliveries a second to a
receiver answering in 250 ms, so a backlog of 523 took 3 minutes. Now up to
WEBHOOK_ENDPOINT_CONCURRENCY (default 10) are in flight per endpoint: the same receiver gets at
least 25 a second, every delivery verified, and `data.sequence` still orders each account's
events (bench/webhook_drain.py prints a backlog's drain time).
"""

from __future__ import annotations

import time
from collections import defaultdict

import pytest

from ciris_billing.events.delivery import Deliveries
from tests.support.api import Api, identity
from tests.support.receiver import receiving

pytestmark = pytest.mark.slow  # a backlog of ~150 deliveries to a 250 ms receiver

ENDPOINTS = "/v1/billing/webhook_endpoints"
ACCOUNTS = 50  # 3 charges each: account.created, balance.low, balance.depleted


async def test_deliveries_are_one_at_a_time_per_endpoint(hooks_api: Api) -> None:
    assert hooks_api.settings.webhook_endpoint_concurrency >= 8  # the default
    with receiving() as receiver:
        receiver.delay = 0.25
        created = await hooks_api.post(ENDPOINTS, {"url": receiver.url}, scope="admin")
        assert created.status_code == 201, created.text
        receiver.secret = created.json()["secret"]
        for index in range(ACCOUNTS):
            who = identity(f"backlog-{index}@example.com")
            for _ in range(3):
                assert (await hooks_api.post("/v1/billing/charges", who)).status_code == 201
        deliveries = Deliveries(hooks_api.engine, hooks_api.settings)
        backlog = await deliveries.dispatch()
        started = time.monotonic()
        delivered = 0
        while delivered < backlog:
            report = await deliveries.run_once()
            assert report.runs, "nothing left to deliver before the backlog was drained"
            delivered += report.delivered
        elapsed = time.monotonic() - started
        await deliveries.aclose()
    rate = delivered / elapsed
    print(f"{delivered} deliveries to a 250 ms receiver in {elapsed:.1f} s: {rate:.1f}/s")
    assert rate >= 25
    assert receiver.rejected == []
    assert len(set(receiver.ids())) == backlog
    # Concurrent sends may arrive out of order; each account's `data.sequence` has no gap.
    sequences: dict[str, list[int]] = defaultdict(list)
    for got in receiver.received:
        data = got.payload["data"]
        sequences[data["account_id"]].append(data["sequence"])
    # (3 charges of 3 free uses: account.created and balance.depleted; a free plan has no
    # default balance.low since issue 21 finding 15, so the count is not fixed here.)
    assert all(sorted(seen) == list(range(1, len(seen) + 1)) for seen in sequences.values()), (
        sequences
    )
    assert (await hooks_api.audit()).clean
