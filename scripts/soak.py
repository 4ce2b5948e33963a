"""`make soak`: minutes of mixed traffic against PostgreSQL with several workers, then totals.

Agents check and charge, users buy (sandbox provider: purchase, pay with a test card, the
signed webhook credits), some with declined cards. Faults are injected all along (SOAK_FAULTS=1,
the default): every worker is SIGKILLed every ~15 s, and every ~20 s, for 3 s, every connection
to the soak's database is terminated every 0.3 s. A charge without a definite answer (no answer,
503) is retried with its Idempotency-Key, as a client should.

At the end, with NO operator command (the background jobs retry and reconcile; they get up to
SOAK_RECOVERY_SECONDS, default 120, to finish), the books must reconcile exactly: uses the
clients were told were charged == uses in the `charges` ledger; payments the provider (sandbox)
holds as paid == purchase credits in the `credits` ledger == credited purchases, each once, and
every payment a client was told succeeded among them; `ciris-billing audit` (which also asks
the provider about every purchase) clean; no 500.

Everything runs on 127.0.0.1 and stops by itself. Options: SOAK_SECONDS (default 180),
SOAK_CONCURRENCY (64), SOAK_WORKERS (2), SOAK_FAULTS (1; 0 for none),
SOAK_RESTART_POSTGRES=1 to restart PostgreSQL once in the middle (it restarts the machine's
whole local cluster: not for shared machines).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support.cli import cli, create_key  # noqa: E402
from tests.support.faults import ServiceProcesses  # noqa: E402
from tests.support.servers import running_service, service_env  # noqa: E402

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SECONDS = float(os.environ.get("SOAK_SECONDS", "180"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "64"))
WORKERS = int(os.environ.get("SOAK_WORKERS", "2"))
FAULTS = os.environ.get("SOAK_FAULTS", "1") == "1"
RECOVERY_SECONDS = float(os.environ.get("SOAK_RECOVERY_SECONDS", "120"))
USERS = 2_000


class Totals:
    def __init__(self) -> None:
        self.requests = 0
        self.status: collections.Counter[str] = collections.Counter()
        self.uses_charged = 0
        self.purchases_succeeded = 0
        self.purchases_declined = 0
        self.transport_errors = 0
        self.told_paid: set[str] = set()
        self.worker_kills = 0
        self.connections_killed = 0
        self.charges_retried = 0

    def saw(self, what: str, response: httpx.Response) -> None:
        self.requests += 1
        self.status[f"{what} {response.status_code}"] += 1


async def agent_turn(http: httpx.AsyncClient, totals: Totals, user: dict[str, str]) -> None:
    checked = await http.post("/v1/billing/credits/check", json=user)
    totals.saw("check", checked)
    uses = random.choice((1, 1, 1, 2))
    charged = await charge(http, totals, {**user, "uses": uses, "description": "soak"})
    if charged is None:
        return
    totals.saw("charge", charged)
    if charged.status_code == 201:
        totals.uses_charged += uses
    elif charged.status_code == 402:
        await buy(http, totals, user)


async def charge(
    http: httpx.AsyncClient, totals: Totals, body: dict[str, object]
) -> httpx.Response | None:
    """One charge, retried with its key until it has a definite answer (a lost answer or a 503
    may hide a commit: the key replays it instead of charging again)."""
    key = uuid.uuid4().hex
    deadline = time.monotonic() + 60
    while True:
        try:
            answer = await http.post(
                "/v1/billing/charges", json=body, headers={"Idempotency-Key": key}
            )
            if answer.status_code != 503:
                return answer
            totals.saw("charge", answer)
        except httpx.TransportError:
            totals.transport_errors += 1
        if time.monotonic() > deadline:
            return None  # never answered: the key was charged at most once; reported below
        totals.charges_retried += 1
        await asyncio.sleep(0.2)


async def buy(http: httpx.AsyncClient, totals: Totals, user: dict[str, str]) -> None:
    bought = await http.post("/v1/billing/purchases", json=user)
    totals.saw("purchase", bought)
    if bought.status_code != 201:
        return
    card = "4000 0000 0000 9995" if random.random() < 0.1 else "4242 4242 4242 4242"
    paid = await http.post(
        f"/v1/billing/sandbox/payment_intents/{bought.json()['payment_id']}/confirm",
        json={"client_secret": bought.json()["client_secret"], "card_number": card},
    )
    totals.saw("pay", paid)
    if paid.status_code == 200 and paid.json()["status"] == "succeeded":
        totals.purchases_succeeded += 1
        totals.told_paid.add(bought.json()["payment_id"])
    elif paid.status_code == 402:
        totals.purchases_declined += 1


async def worker(base: str, key: str, totals: Totals, deadline: float) -> None:
    async with httpx.AsyncClient(base_url=base, headers={"X-API-Key": key}, timeout=30) as http:
        while time.monotonic() < deadline:
            user = {
                "oauth_provider": "oauth:google",
                "external_id": f"soak-{random.randrange(USERS)}@x.y",
            }
            try:
                await agent_turn(http, totals, user)
            except httpx.TransportError:
                totals.transport_errors += 1
                await asyncio.sleep(0.05)


async def ledger_totals(database_url: str) -> dict[str, int]:
    conn = await asyncpg.connect(database_url)
    try:
        paid = {r["id"] for r in await conn.fetch(PAID)}
        credited = {r["external_transaction_id"]: r["n"] for r in await conn.fetch(CREDITED)}
        return {
            "provider_paid": len(paid),
            "paid_uncredited": len(paid - set(credited)),
            "credited_twice": sum(1 for n in credited.values() if n > 1),
            "charged_uses": await conn.fetchval("SELECT coalesce(sum(uses), 0) FROM charges"),
            "charge_rows": await conn.fetchval("SELECT count(*) FROM charges"),
            "purchase_credits": await conn.fetchval(
                "SELECT count(*) FROM credits WHERE kind = 'purchase'"
            ),
            "succeeded_purchases": await conn.fetchval(
                "SELECT count(*) FROM purchases WHERE credited_at IS NOT NULL"
            ),
        }
    finally:
        await conn.close()


PAID = "SELECT id FROM sandbox_payments WHERE status = 'succeeded'"
CREDITED = (
    "SELECT external_transaction_id, count(*) AS n FROM credits WHERE kind = 'purchase' "
    "GROUP BY external_transaction_id"
)


async def paid_ids(database_url: str) -> set[str]:
    conn = await asyncpg.connect(database_url)
    try:
        return {r["id"] for r in await conn.fetch(PAID)}
    finally:
        await conn.close()


async def settled(database_url: str) -> dict[str, int]:
    """Wait, doing nothing, for the service's own jobs to credit every paid purchase."""
    deadline = time.monotonic() + RECOVERY_SECONDS
    while True:
        books = await ledger_totals(database_url)
        done = (
            books["provider_paid"] == books["purchase_credits"] == books["succeeded_purchases"]
            and not books["paid_uncredited"]
        )
        if done or time.monotonic() > deadline:
            return books
        await asyncio.sleep(1)


async def kill_workers(processes: ServiceProcesses, totals: Totals, deadline: float) -> None:
    """SIGKILL every worker of our service (by pid, checked ours) every ~15 s."""
    while time.monotonic() + 15 < deadline:
        await asyncio.sleep(random.uniform(10, 20))
        for pid in processes.workers():
            processes.kill_worker(pid, signal.SIGKILL)
            totals.worker_kills += 1


async def kill_connections(name: str, totals: Totals, deadline: float) -> None:
    """Every ~20 s, for 3 s, terminate every connection to the soak's own database every 0.3 s."""
    admin = await asyncpg.connect(ADMIN_URL, timeout=5)
    try:
        while time.monotonic() + 20 < deadline:
            await asyncio.sleep(random.uniform(15, 25))
            burst_end = time.monotonic() + 3
            while time.monotonic() < burst_end:
                totals.connections_killed += await admin.fetchval(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) "
                    "FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                    name,
                )
                await asyncio.sleep(0.3)
    finally:
        await admin.close()


def restart_postgres() -> None:
    cluster = os.listdir("/etc/postgresql")[0]
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"]
    subprocess.run(command, check=True)  # noqa: S603 (a fixed command of this machine's)


async def soak(
    base: str, key: str, database_url: str, processes: ServiceProcesses | None
) -> Totals:
    totals = Totals()
    deadline = time.monotonic() + SECONDS
    tasks = [asyncio.create_task(worker(base, key, totals, deadline)) for _ in range(CONCURRENCY)]
    if FAULTS and processes is not None:
        name = database_url.rsplit("/", 1)[1]
        tasks.append(asyncio.create_task(kill_workers(processes, totals, deadline)))
        tasks.append(asyncio.create_task(kill_connections(name, totals, deadline)))
    if os.environ.get("SOAK_RESTART_POSTGRES") == "1":
        await asyncio.sleep(SECONDS / 2)
        await asyncio.to_thread(restart_postgres)
    await asyncio.gather(*tasks)
    return totals


def main() -> int:
    name = f"ciris_billing_soak_{os.getpid()}"
    base_url = ADMIN_URL.rsplit("/", 1)[0]
    database_url = f"{base_url}/{name}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        env = service_env(
            database_url,
            # INFO: the fault injector finds the workers' parent by its "Started parent process".
            LOG_LEVEL="INFO" if FAULTS else "WARNING",
            PAYMENT_PROVIDER="sandbox",
            # The background jobs at a soak's pace: retries every 2 s, purchases not final
            # after 10 s checked with the provider (production: 10 s and 180 s).
            JOBS_POLL_SECONDS="2",
            RECONCILE_AFTER_SECONDS="10",
            RATE_LIMIT_KEY_PER_SECOND="0",
            RATE_LIMIT_ACCOUNT_PER_MINUTE="0",
        )
        assert cli(env, "migrate").returncode == 0
        key = create_key(env, "write")
        log = Path(tempfile.gettempdir()) / f"{name}.log"
        started = time.monotonic()
        with running_service(env, log, workers=WORKERS) as base:
            processes = ServiceProcesses.from_log(log) if WORKERS > 1 else None
            totals = asyncio.run(soak(base, key, database_url, processes))
            elapsed = time.monotonic() - started
            waited = time.monotonic()
            books = asyncio.run(settled(database_url))  # no operator command: the jobs do it
            waited = time.monotonic() - waited
            paid = asyncio.run(paid_ids(database_url))
        audited = cli(env, "audit")
        print(f"Soak: {SECONDS:.0f} s, {CONCURRENCY} clients, {WORKERS} workers, PostgreSQL")
        if FAULTS:
            print(
                f"faults: {totals.worker_kills} worker kills, {totals.connections_killed} "
                f"connections terminated; charges retried with their key: "
                f"{totals.charges_retried}"
            )
        rate = totals.requests / elapsed
        print(
            f"requests: {totals.requests} ({rate:.0f}/s), "
            f"transport errors: {totals.transport_errors}"
        )
        for what, count in sorted(totals.status.items()):
            print(f"  {what}: {count}")
        print(
            f"uses charged (201s): {totals.uses_charged}  ledger charges: "
            f"{books['charged_uses']} uses in {books['charge_rows']} rows"
        )
        print(
            f"purchases paid (clients told 200): {totals.purchases_succeeded}  paid at the "
            f"provider: {books['provider_paid']}  purchase credits (ledger): "
            f"{books['purchase_credits']}  credited purchases: {books['succeeded_purchases']}  "
            f"declined: {totals.purchases_declined}"
        )
        print(
            f"settled by the background jobs {waited:.0f} s after the traffic ended, with no "
            f"operator command: paid but uncredited {books['paid_uncredited']}, credited twice "
            f"{books['credited_twice']}"
        )
        print(audited.stdout.strip())
        server_errors = sum(c for k, c in totals.status.items() if k.endswith((" 500", " 502")))
        ok = (
            totals.uses_charged == books["charged_uses"]
            and books["provider_paid"] == books["purchase_credits"] == books["succeeded_purchases"]
            and not books["paid_uncredited"]
            and not books["credited_twice"]
            and totals.told_paid <= paid
            and audited.returncode == 0
            and server_errors == 0
        )
        print("RECONCILED EXACTLY" if ok else "MISMATCH")
        return 0 if ok else 1
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_URL)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
