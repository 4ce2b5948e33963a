"""`make soak`: minutes of mixed traffic against PostgreSQL with several workers, then totals.

Agents check and charge, users buy (sandbox provider: purchase, pay with a test card, the
signed webhook credits), some with declined cards. At the end the books must reconcile exactly:
uses the clients were told were charged == uses in the `charges` ledger, and purchases the
clients saw succeed == purchase credits in the `credits` ledger; `ciris-billing audit` clean.

Everything runs on 127.0.0.1 and stops by itself. Options: SOAK_SECONDS (default 180),
SOAK_CONCURRENCY (64), SOAK_WORKERS (2), SOAK_RESTART_POSTGRES=1 to restart PostgreSQL once
in the middle (it restarts the machine's whole local cluster: not for shared machines).
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
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
from tests.support.servers import running_service, service_env  # noqa: E402

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
SECONDS = float(os.environ.get("SOAK_SECONDS", "180"))
CONCURRENCY = int(os.environ.get("SOAK_CONCURRENCY", "64"))
WORKERS = int(os.environ.get("SOAK_WORKERS", "2"))
USERS = 2_000


class Totals:
    def __init__(self) -> None:
        self.requests = 0
        self.status: collections.Counter[str] = collections.Counter()
        self.uses_charged = 0
        self.purchases_succeeded = 0
        self.purchases_declined = 0
        self.transport_errors = 0

    def saw(self, what: str, response: httpx.Response) -> None:
        self.requests += 1
        self.status[f"{what} {response.status_code}"] += 1


async def agent_turn(http: httpx.AsyncClient, totals: Totals, user: dict[str, str]) -> None:
    checked = await http.post("/v1/billing/credits/check", json=user)
    totals.saw("check", checked)
    uses = random.choice((1, 1, 1, 2))
    charged = await http.post(
        "/v1/billing/charges",
        json={**user, "uses": uses, "description": "soak"},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    totals.saw("charge", charged)
    if charged.status_code == 201:
        totals.uses_charged += uses
    elif charged.status_code == 402:
        await buy(http, totals, user)


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
        return {
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


def restart_postgres() -> None:
    cluster = os.listdir("/etc/postgresql")[0]
    command = ["pg_ctlcluster", "--skip-systemctl-redirect", cluster, "main", "restart"]
    subprocess.run(command, check=True)  # noqa: S603 (a fixed command of this machine's)


async def soak(base: str, key: str, database_url: str) -> Totals:
    totals = Totals()
    deadline = time.monotonic() + SECONDS
    tasks = [asyncio.create_task(worker(base, key, totals, deadline)) for _ in range(CONCURRENCY)]
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
            LOG_LEVEL="WARNING",
            PAYMENT_PROVIDER="sandbox",
            RATE_LIMIT_KEY_PER_SECOND="0",
            RATE_LIMIT_ACCOUNT_PER_MINUTE="0",
        )
        assert cli(env, "migrate").returncode == 0
        key = create_key(env, "write")
        log = Path(tempfile.gettempdir()) / f"{name}.log"
        started = time.monotonic()
        with running_service(env, log, workers=WORKERS) as base:
            totals = asyncio.run(soak(base, key, database_url))
        elapsed = time.monotonic() - started
        books = asyncio.run(ledger_totals(database_url))
        audited = cli(env, "audit")
        print(f"Soak: {SECONDS:.0f} s, {CONCURRENCY} clients, {WORKERS} workers, PostgreSQL")
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
            f"purchases paid (clients): {totals.purchases_succeeded}  purchase credits (ledger): "
            f"{books['purchase_credits']}  credited purchases: {books['succeeded_purchases']}  "
            f"declined: {totals.purchases_declined}"
        )
        print(audited.stdout.strip())
        server_errors = sum(c for k, c in totals.status.items() if k.endswith((" 500", " 502")))
        ok = (
            totals.uses_charged == books["charged_uses"]
            and totals.purchases_succeeded
            == books["purchase_credits"]
            == books["succeeded_purchases"]
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
