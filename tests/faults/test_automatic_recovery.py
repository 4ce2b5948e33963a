"""Finding 1, "Paid but not credited until an operator acts": the attacks that left paid
purchases uncredited, replayed against the real service (`ciris-billing serve`, 2 workers,
sandbox payments), and recovery with NO operator command: within 2 minutes every purchase the
sandbox holds as paid is credited exactly once, every customer told "succeeded" among them,
and `ciris-billing audit` (which asks the provider) is clean.

(a) both workers SIGKILLed, again and again, while customers buy and pay;
(b) `pg_terminate_backend` on every connection of the service's database every 0.3 s while
customers buy and pay.

The background jobs run with short intervals here (JOBS_POLL_SECONDS=2,
RECONCILE_AFTER_SECONDS=5). Only processes this test started are killed, by pid, and only this
test's own database's connections.

(No __init__.py in this folder while tests/faults.py is a module of the same name.)
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx

from tests.support.cli import cli, create_key
from tests.support.faults import ServiceProcesses
from tests.support.servers import running_service, service_env

RECOVERY_SECONDS = 120
JOB_SETTINGS = {
    "JOBS_POLL_SECONDS": "2",
    "RECONCILE_AFTER_SECONDS": "5",
    "RATE_LIMIT_ACCOUNT_PER_MINUTE": "60000",
    "RATE_LIMIT_KEY_PER_SECOND": "0",
    "PAYMENT_PROVIDER": "sandbox",
}


@dataclass
class Flows:
    told_paid: set[str] = field(default_factory=set)  # payment ids answered 200 "succeeded"
    started: int = 0
    failed_requests: int = 0


async def buy_and_pay(http: httpx.AsyncClient, flows: Flows, who: str) -> None:
    """One customer: start a purchase, pay it with the test card that succeeds."""
    try:
        bought = await http.post(
            "/v1/billing/purchases",
            json={"oauth_provider": "oauth:google", "external_id": who},
        )
        if bought.status_code != 201:
            flows.failed_requests += 1
            return
        flows.started += 1
        body = bought.json()
        paid = await http.post(
            f"/v1/billing/sandbox/payment_intents/{body['payment_id']}/confirm",
            json={"client_secret": body["client_secret"], "card_number": "4242424242424242"},
        )
    except httpx.TransportError:
        flows.failed_requests += 1
        return
    if paid.status_code == 200 and paid.json()["status"] == "succeeded":
        flows.told_paid.add(body["payment_id"])
    else:
        flows.failed_requests += 1


async def run_flows(base: str, key: str, prefix: str, count: int, concurrency: int) -> Flows:
    flows = Flows()
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=base,
        headers={"X-API-Key": key},
        limits=httpx.Limits(max_connections=concurrency, keepalive_expiry=1),
        timeout=30,
    ) as http:

        async def one(index: int) -> None:
            async with gate:
                await buy_and_pay(http, flows, f"{prefix}-{index}@example.com")

        await asyncio.gather(*(one(index) for index in range(count)))
    return flows


@dataclass(frozen=True)
class Books:
    paid: set[str]  # the provider's (sandbox's) succeeded payments
    credits: dict[str, int]  # purchase credits per payment id
    credited_purchases: set[str]  # payment ids of purchases marked credited

    def settled(self) -> bool:
        return set(self.credits) == self.paid == self.credited_purchases and set(
            self.credits.values()
        ) <= {1}

    def summary(self) -> str:
        missing = self.paid - set(self.credits)
        return (
            f"{len(self.paid)} paid at the provider, {len(self.credits)} credited "
            f"({len(missing)} paid but uncredited, "
            f"{sum(1 for n in self.credits.values() if n > 1)} credited twice)"
        )


async def books(database_url: str) -> Books:
    conn = await asyncpg.connect(database_url)
    try:
        paid = {
            r["id"]
            for r in await conn.fetch("SELECT id FROM sandbox_payments WHERE status = 'succeeded'")
        }
        credits = {
            r["external_transaction_id"]: int(r["n"])
            for r in await conn.fetch(
                "SELECT external_transaction_id, count(*) AS n FROM credits "
                "WHERE kind = 'purchase' GROUP BY external_transaction_id"
            )
        }
        credited = {
            r["payment_id"]
            for r in await conn.fetch(
                "SELECT payment_id FROM purchases WHERE credited_at IS NOT NULL"
            )
        }
        return Books(paid, credits, credited)
    finally:
        await conn.close()


async def wait_until_settled(database_url: str, timeout: float = RECOVERY_SECONDS) -> Books:
    """No operator command: only the service itself may fix the books."""
    deadline = time.monotonic() + timeout
    while True:
        found = await books(database_url)
        if found.settled() or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1)


async def test_paid_but_not_credited_until_an_operator_acts_workers_killed(
    fresh_database: str, tmp_path: Path
) -> None:
    """(a) 150 customers buy and pay while both workers are SIGKILLed, every 0.7-1.5 s."""
    env = service_env(fresh_database, **JOB_SETTINGS)
    key = create_key(env, "write")
    log_path = tmp_path / "server.log"
    kills = 0
    with running_service(env, log_path, workers=2) as base:
        processes = ServiceProcesses.from_log(log_path)
        processes.wait_for_workers(2)
        buying = asyncio.Event()

        async def killer() -> None:
            nonlocal kills
            while not buying.is_set():
                await asyncio.sleep(random.uniform(0.7, 1.5))
                for pid in processes.workers():
                    processes.kill_worker(pid, signal.SIGKILL)
                    kills += 1
                await asyncio.to_thread(processes.wait_for_workers, 2)

        chaos = asyncio.create_task(killer())
        try:
            flows = await run_flows(base, key, "sigkill-pay", 150, concurrency=16)
        finally:
            buying.set()
            await chaos
        processes.wait_for_workers(2)
        found = await wait_until_settled(fresh_database)
        print(
            f"{kills} worker kills; {flows.started} purchases started, {len(flows.told_paid)} "
            f"customers told paid, {flows.failed_requests} requests failed; {found.summary()}"
        )
        assert kills >= 4
        assert found.settled(), found.summary()
        assert flows.told_paid <= found.paid
    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr


async def test_paid_but_not_credited_until_an_operator_acts_connections_killed(
    fresh_database: str, postgres_admin_url: str, tmp_path: Path
) -> None:
    """(b) 120 customers buy and pay while every connection to the service's database is
    terminated every 0.3 s."""
    database = urlsplit(fresh_database).path.lstrip("/")
    env = service_env(fresh_database, **JOB_SETTINGS)
    key = create_key(env, "write")
    killed = 0
    with running_service(env, tmp_path / "server.log", workers=2) as base:
        buying = asyncio.Event()

        async def chaos() -> None:
            nonlocal killed
            admin = await asyncpg.connect(postgres_admin_url, timeout=5)
            try:
                while not buying.is_set():
                    killed += await admin.fetchval(
                        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                        "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                        database,
                    )
                    await asyncio.sleep(0.3)
            finally:
                await admin.close()

        task = asyncio.create_task(chaos())
        try:
            flows = await run_flows(base, key, "pgkill-pay", 120, concurrency=16)
        finally:
            buying.set()
            await task
        found = await wait_until_settled(fresh_database)
        print(
            f"pg_terminate_backend killed {killed} connections; {flows.started} purchases "
            f"started, {len(flows.told_paid)} customers told paid, {flows.failed_requests} "
            f"requests failed; {found.summary()}"
        )
        assert killed > 0
        assert found.settled(), found.summary()
        # Every customer told 200 "succeeded" got their uses, exactly once.
        assert flows.told_paid <= found.paid
    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
