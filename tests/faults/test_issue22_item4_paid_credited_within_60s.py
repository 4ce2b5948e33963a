"""Issue 22 item 4, "A paying customer still waits up to 3 minutes": with both workers SIGKILLed
while 60 customers paid in the sandbox, 4 to 7 paid purchases were credited only ~178 s later,
when reconciliation reached them (RECONCILE_AFTER_SECONDS=180).

Now, with the default settings (JOBS_POLL_SECONDS=10, RECONCILE_AFTER_SECONDS=180), every paid
purchase is credited within 60 s of the fault: of the last kill, or of its payment if it came
after (the jobs cannot run while their workers die every few seconds). The payment page
asks the service to confirm a payment the provider said succeeded (`POST .../checkout/{id}/sync`:
the service asks the provider and credits once), the sandbox redelivers its webhooks with
backoff as Stripe does, and a purchase the page saw succeed is reconciled at the jobs' next run.
Half the payers here behave like the page (they ask the service to confirm); the other half
close the page at once (only the redelivered webhook and reconciliation can credit them).
Only processes this test started are killed, by pid.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.support.cli import cli, create_key
from tests.support.faults import ServiceProcesses
from tests.support.servers import running_service, service_env

pytestmark = pytest.mark.slow  # a real service, 2 workers killed again and again, ~1-2 min

PAYERS = 60
CREDIT_WITHIN_SECONDS = 60
# Both workers SIGKILLed every 1.5-3 s (once both serve again) while the payers pay.
KILL_EVERY = (1.5, 3.0)
ARRIVE_EVERY = 0.5  # a payer every half second
TRIES = 10  # a payer whose request failed clicks again, up to this many times
GATHER_SECONDS = 420  # bounded: CI once needed more than 240 s for the payers alone
SETTLE_SECONDS = 120  # how long the test waits for the books to settle before failing
SETTINGS = {  # JOBS_POLL_SECONDS and RECONCILE_AFTER_SECONDS: their defaults
    "RATE_LIMIT_ACCOUNT_PER_MINUTE": "60000",
    "RATE_LIMIT_KEY_PER_SECOND": "0",
    "PAYMENT_PROVIDER": "sandbox",
}


@dataclass
class Payers:
    told_paid: set[str] = field(default_factory=set)
    synced: set[str] = field(default_factory=set)  # payment ids the page saw credited
    failed_requests: int = 0
    paying: int = PAYERS  # payers not past their payment yet (the faults stop at 0)
    all_paid: asyncio.Event = field(default_factory=asyncio.Event)

    def past_payment(self) -> None:
        self.paying -= 1
        if self.paying == 0:
            self.all_paid.set()


async def sync_like_the_page(http: httpx.AsyncClient, payment_id: str, secret: str) -> bool:
    """What checkout.js does once the provider said "succeeded": ask the service to confirm,
    with backoff, for up to 60 s; True once the purchase is credited."""
    started, delay = time.monotonic(), 0.3
    while time.monotonic() - started < 60:
        try:
            answer = await http.post(
                f"/v1/billing/checkout/{payment_id}/sync", headers={"X-Client-Secret": secret}
            )
            if answer.status_code == 200:
                if answer.json()["credited"]:
                    return True
                if answer.json()["payment_status"] != "succeeded":
                    return False  # not paid: the page shows the payment form again
        except httpx.TransportError:
            pass  # a worker was killed under it: ask again
        await asyncio.sleep(delay)
        delay = min(delay * 1.5, 5.0)
    return False


async def pay(http: httpx.AsyncClient, payers: Payers, index: int, gate: asyncio.Semaphore) -> None:
    try:
        async with gate:  # at most 16 customers at the payment form at once
            paid = await buy_and_confirm(http, payers, index)
    finally:
        payers.past_payment()
    if paid is None:
        return
    payment_id, secret = paid
    # Even payers keep the page open (told paid, or reloading after a lost answer: the page
    # then learns the payment's state from the service); odd ones close it at once.
    if index % 2 == 0 and await sync_like_the_page(http, payment_id, secret):
        payers.synced.add(payment_id)


async def buy_and_confirm(
    http: httpx.AsyncClient, payers: Payers, index: int
) -> tuple[str, str] | None:
    """A purchase, paid with the card that succeeds: its payment id and client secret. Like a
    person, a payer whose request failed tries again (the purchase with its idempotency key,
    so a retry finds the same one), up to TRIES times."""
    who = {"oauth_provider": "oauth:google", "external_id": f"payer-{index}@example.com"}
    body: dict[str, str] | None = None
    for _ in range(TRIES):
        try:
            bought = await http.post(
                "/v1/billing/purchases", json=who, headers={"Idempotency-Key": f"buy-{index}"}
            )
            if bought.status_code == 201:
                body = bought.json()
                break
        except httpx.TransportError:
            pass
        payers.failed_requests += 1
        await asyncio.sleep(1)
    if body is None:
        return None
    payment_id, secret = body["payment_id"], body["client_secret"]
    for _ in range(TRIES):
        try:
            paid = await http.post(
                f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
                json={"client_secret": secret, "card_number": "4242424242424242"},
            )
            if paid.status_code == 200 and paid.json()["status"] == "succeeded":
                payers.told_paid.add(payment_id)
            if paid.status_code in (200, 409):  # 409: paid by a try whose answer was lost
                break
        except httpx.TransportError:
            pass
        payers.failed_requests += 1
        await asyncio.sleep(1)
    return payment_id, secret


@dataclass(frozen=True)
class Paid:
    payment_id: str
    paid_at: float  # epoch seconds the sandbox recorded it succeeded
    credited_at: float | None
    credits: int


async def paid_purchases(database_url: str) -> list[Paid]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            """
            SELECT s.id, extract(epoch FROM s.updated_at) AS paid_at,
                   extract(epoch FROM p.credited_at) AS credited_at,
                   (SELECT count(*) FROM credits c
                    WHERE c.kind = 'purchase' AND c.external_transaction_id = s.id) AS credits
            FROM sandbox_payments s JOIN purchases p ON p.payment_id = s.id
            WHERE s.status = 'succeeded'
            """
        )
    finally:
        await conn.close()
    return [
        Paid(
            r["id"],
            float(r["paid_at"]),
            None if r["credited_at"] is None else float(r["credited_at"]),
            int(r["credits"]),
        )
        for r in rows
    ]


async def test_a_paying_customer_still_waits_up_to_3_minutes(
    fresh_database: str, tmp_path: Path
) -> None:
    env = service_env(fresh_database, **SETTINGS)
    key = create_key(env, "write")
    log_path = tmp_path / "server.log"
    kills, last_kill = 0, 0.0
    with running_service(env, log_path, workers=2) as base:
        processes = ServiceProcesses.from_log(log_path)
        processes.wait_for_workers(2)
        buying = asyncio.Event()
        payers = Payers()

        async def killer() -> None:
            nonlocal kills, last_kill
            started = 2  # worker start-ups so far
            while not buying.is_set() and not payers.all_paid.is_set():
                await asyncio.sleep(random.uniform(KILL_EVERY[0], KILL_EVERY[1]))
                for pid in processes.workers():
                    processes.kill_worker(pid, signal.SIGKILL)
                    kills += 1
                    started += 1
                    last_kill = time.time()
                # Back = serving again: a worker's process exists seconds before it has
                # imported the app, and killing it then would keep the service down throughout.
                await asyncio.to_thread(processes.wait_for_started, log_path, started)

        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(
            base_url=base,
            headers={"X-API-Key": key},
            limits=httpx.Limits(max_connections=16, keepalive_expiry=1),
            timeout=30,
        ) as http:

            async def one(index: int) -> None:
                await asyncio.sleep(index * ARRIVE_EVERY)  # customers arrive over ~30 s
                # A page waiting for its credit does not keep the next customer from paying.
                await pay(http, payers, index, gate)

            chaos = asyncio.create_task(killer())
            try:
                # The faults go on while the first payers' pages ask; then they stop.
                await asyncio.wait_for(
                    asyncio.gather(*(one(index) for index in range(PAYERS))), timeout=GATHER_SECONDS
                )
            finally:
                buying.set()
                await chaos
        processes.wait_for_workers(2)
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            found = await paid_purchases(fresh_database)
            if all(p.credited_at is not None for p in found) or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        credited = [p for p in found if p.credited_at is not None]
        uncredited = [p.payment_id for p in found if p.credited_at is None]
        waits = [p.credited_at - p.paid_at for p in credited if p.credited_at]
        # From the fault: the last kill, or the payment when it came after the last kill.
        from_fault = [p.credited_at - max(p.paid_at, last_kill) for p in credited if p.credited_at]
        print(
            f"{kills} worker kills; {len(found)} paid at the provider, {len(payers.told_paid)} "
            f"payers told paid, {len(payers.synced)} pages saw the credit, "
            f"{payers.failed_requests} requests failed; {len(credited)} credited, "
            f"{len(uncredited)} not; fault -> credited: max {max(from_fault, default=0):.1f} s; "
            f"paid -> credited: max {max(waits, default=0):.1f} s, "
            f"{sum(1 for w in waits if w > 10)} over 10 s"
        )
        assert kills >= 4
        assert len(found) >= PAYERS * 3 // 4
        assert uncredited == [], uncredited
        assert max(from_fault) <= CREDIT_WITHIN_SECONDS, sorted(from_fault)[-5:]
        assert all(p.credits == 1 for p in found)
        assert payers.told_paid <= {p.payment_id for p in found}
    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
