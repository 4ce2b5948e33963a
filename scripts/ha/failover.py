"""`make test-ha`: a real failover under load, on 127.0.0.1, bounded, with a printed summary.

etcd, two Patroni nodes (PostgreSQL 15, synchronous_mode), Redis, HAProxy routing database
connections to the leader (Patroni's /primary check) and HTTP over three `ciris-billing serve`
instances (2 workers each, REDIS_URL set). A client storm goes through the HTTP front: credit
checks, charges with idempotency keys, purchases paid in the sandbox; every non-2xx answer (and
every broken connection) is retried with the same key, as the agent client does (429, 5xx,
Retry-After honoured). Mid-storm:

  round 1: kill -9 the leader's postgres (Patroni fails over to the synchronous standby);
  round 2: once the old node is back as synchronous standby, kill -9 the leader's Patroni;
  then kill -9 one service instance (HAProxy routes around it).

Nothing is restarted by hand: the services reconnect by themselves. Then, on the new leader:
every charge answered 201 is in the ledger exactly once (acknowledged but lost: 0), no charge
twice, every paid purchase credited exactly once, `ciris-billing audit` clean. Prints the
failover times, client-visible errors and retries, and throughput before/during/after.
Exit status 0 only if every check holds.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import Cluster, Node, require_programs

# The agent client's retry policy (src/ciris_billing/client/_core.py): these statuses and
# broken connections are retried; Retry-After on 429/503 is honoured.
RETRYABLE = frozenset({429, 500, 502, 503, 504})
BOUND_SECONDS = 290  # the whole run, set-up and clean-up included, stays under 5 minutes
AGENTS = 16
USERS = 40
PAID = 1_000_000  # uses granted to each user up front: charges are never refused for lack
CARD = "4242 4242 4242 4242"


@dataclass
class Attempt:
    kind: str
    started: float
    ended: float
    status: int  # 0: no answer (connection refused, reset, timed out)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 or self.status == 402

    @property
    def failed(self) -> bool:
        return not self.ok


@dataclass
class Storm:
    http: httpx.AsyncClient
    key: str
    users: list[dict[str, str]]
    attempts: list[Attempt] = field(default_factory=list)
    charges: dict[str, tuple[int, str | None]] = field(default_factory=dict)  # key: status, id
    confirmed: dict[str, int] = field(default_factory=dict)  # payment id: final status
    unresolved: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    give_up_at: float = float("inf")
    operations: int = 0
    # Filled in by verify(): charges answered 201, charges in the ledger, payments that
    # succeeded, payments confirmed 200 to the client.
    verified: tuple[int, int, int, int] = (0, 0, 0, 0)

    async def call(
        self, kind: str, path: str, body: dict[str, object], key: str | None = None
    ) -> httpx.Response | None:
        """One operation, retried like the agent client until answered for good."""
        headers = {"X-API-Key": self.key}
        if key is not None:
            headers["Idempotency-Key"] = key
        backoff = 0.1
        self.operations += 1
        while True:
            started = time.monotonic()
            response: httpx.Response | None = None
            try:
                response = await self.http.post(path, json=body, headers=headers)
                status = response.status_code
            except httpx.HTTPError:
                status = 0
            self.attempts.append(Attempt(kind, started, time.monotonic(), status))
            if status and status not in RETRYABLE:
                return response
            if time.monotonic() > self.give_up_at:
                self.unresolved.append(f"{kind} {key or ''} (last status {status})")
                return None
            delay = backoff
            if response is not None and "Retry-After" in response.headers:
                delay = max(delay, min(float(response.headers["Retry-After"]), 2.0))
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, 1.0)

    async def agent(self, number: int) -> None:
        n = 0
        while not self.stopping.is_set():
            n += 1
            user = random.choice(self.users)
            await self.call("check", "/v1/billing/credits/check", user)
            key = f"ha-charge-{number}-{n}"
            answer = await self.call(
                "charge", "/v1/billing/charges", {**user, "description": key}, key
            )
            if answer is not None:
                charge_id = answer.json().get("charge_id") if answer.status_code == 201 else None
                self.charges[key] = (answer.status_code, charge_id)
            if n % 10 == 0:
                await self.buy(user, f"ha-buy-{number}-{n}")

    async def buy(self, user: dict[str, str], key: str) -> None:
        created = await self.call(
            "purchase", "/v1/billing/purchases", {**user, "customer_email": "ha@example.com"}, key
        )
        if created is None or created.status_code != 201:
            return
        purchase = created.json()
        if not purchase.get("client_secret"):
            return
        paid = await self.call(
            "confirm",
            f"/v1/billing/sandbox/payment_intents/{purchase['payment_id']}/confirm",
            {"client_secret": purchase["client_secret"], "card_number": CARD},
        )
        if paid is not None:
            self.confirmed[purchase["payment_id"]] = paid.status_code

    # --- what the attempts say ----------------------------------------------------------------

    def outage(self, since: float) -> tuple[float, float] | None:
        """(first failed answer at or after `since`, first success of a request sent after
        it), or None if nothing failed."""
        failed = [a.ended for a in self.attempts if a.failed and a.ended >= since]
        if not failed:
            return None
        first = min(failed)
        after = [a.ended for a in self.attempts if a.ok and a.started >= first]
        return first, min(after) if after else float("nan")

    def latencies(self, start: float, end: float) -> str:
        """p50/p99 of successful answers by kind, in ms, between `start` and `end`."""
        by_kind: dict[str, list[float]] = {}
        for a in self.attempts:
            if a.ok and start <= a.ended < end:
                by_kind.setdefault(a.kind, []).append((a.ended - a.started) * 1000)
        parts = []
        for kind, values in sorted(by_kind.items()):
            values.sort()
            p50, p99 = (
                values[len(values) // 2],
                values[min(len(values) - 1, len(values) * 99 // 100)],
            )
            parts.append(f"{kind} {p50:.0f}/{p99:.0f}")
        return ", ".join(parts)

    def throughput(self, start: float, end: float) -> str:
        if end <= start:
            return "-"
        ok = sum(1 for a in self.attempts if a.ok and start <= a.ended < end)
        return f"{ok / (end - start):,.0f}/s ({end - start:.1f} s)"


def log(message: str) -> None:
    print(f"[test-ha {time.strftime('%H:%M:%S')}] {message}", flush=True)


async def create_database(cluster: Cluster) -> None:
    """CREATE DATABASE through HAProxy, once it routes to the leader (just started, it may
    still try the standby until that node's first health check has failed)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = await asyncpg.connect(
                cluster.database_url.rsplit("/", 1)[0] + "/postgres", timeout=5
            )
            try:
                if not await conn.fetchval("SELECT pg_is_in_recovery()"):
                    await conn.execute("CREATE DATABASE billing")
                    return
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("HAProxy did not route to the leader within 30 s")
        await asyncio.sleep(0.5)


async def create_users(http: httpx.AsyncClient, key: str) -> list[dict[str, str]]:
    users = [
        {"oauth_provider": "oauth:google", "external_id": f"ha-{n}@example.com"}
        for n in range(USERS)
    ]
    for user in users:
        made = await http.post(
            "/v1/billing/accounts",
            json={**user, "initial_balance_minor": PAID},
            headers={"X-API-Key": key},
        )
        if made.status_code != 201:
            raise RuntimeError(f"account: {made.status_code} {made.text}")
    return users


async def until(what: str, ready: Callable[[], bool], seconds: float) -> float:
    """Wait (without blocking the storm) for `ready()`; the moment it held."""
    deadline = time.monotonic() + seconds
    while True:
        if await asyncio.to_thread(ready):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {seconds:.0f} s")
        await asyncio.sleep(0.2)


@dataclass
class Round:
    name: str
    killed_at: float
    old: Node
    new: Node | None = None
    promoted_at: float = float("nan")
    outage: tuple[float, float] | None = None


async def failover_round(cluster: Cluster, storm: Storm, name: str, kill_patroni: bool) -> Round:
    old = cluster.leader()
    assert old is not None, "no leader"
    if kill_patroni:
        assert old.patroni is not None
        target = old.patroni.pid
        log(f"{name}: kill -9 Patroni of the leader {old.name} (pid {target})")
    else:
        pid = old.postmaster_pid()
        assert pid is not None
        target = pid
        log(f"{name}: kill -9 postgres (postmaster) of the leader {old.name} (pid {target})")
    killed = Round(name, time.monotonic(), old)
    os.kill(target, signal.SIGKILL)
    other = next(node for node in cluster.nodes if node is not old)
    killed.promoted_at = await until(f"{name}: {other.name} promoted", other.is_leader, 90)
    killed.new = other
    log(f"{name}: {other.name} is the leader after {killed.promoted_at - killed.killed_at:.1f} s")

    def recovered() -> bool:
        outage = storm.outage(killed.killed_at)
        return outage is not None and outage[1] == outage[1] and time.monotonic() > outage[1] + 5

    await until(f"{name}: the service recovered", recovered, 60)
    killed.outage = storm.outage(killed.killed_at)
    return killed


async def verify(cluster: Cluster, storm: Storm, leader: Node, key_id: str) -> list[str]:
    """The checks on the new leader's own data; each problem as a line (none: all good)."""
    problems: list[str] = []
    conn = await asyncpg.connect(f"{leader.url}/billing", timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_key, id FROM charges WHERE api_key_id = $1 "
            "AND idempotency_key LIKE 'ha-charge-%'",
            key_id,
        )
        in_ledger: dict[str, list[str]] = {}
        for row in rows:
            in_ledger.setdefault(row["idempotency_key"], []).append(row["id"])
        acknowledged = {k: cid for k, (status, cid) in storm.charges.items() if status == 201}
        lost = [k for k, cid in acknowledged.items() if in_ledger.get(k) != [cid]]
        twice = [k for k, ids in in_ledger.items() if len(ids) > 1]
        unanswered = [k for k in in_ledger if k not in acknowledged]
        described = await conn.fetchval(
            "SELECT count(*) FROM charges WHERE description LIKE 'ha-charge-%'"
        )
        if lost:
            problems.append(f"acknowledged but lost (or another id): {len(lost)}: {lost[:5]}")
        if twice or described != len(rows):
            problems.append(f"charges applied twice: {twice[:5]} ({described} vs {len(rows)})")
        if unanswered:
            problems.append(f"charges in the ledger never acknowledged: {unanswered[:5]}")

        async def credits_for_paid() -> list[asyncpg.Record]:
            return await conn.fetch(
                "SELECT p.id, count(c.id) AS credited FROM sandbox_payments p "
                "LEFT JOIN credits c ON c.external_transaction_id = p.id "
                "WHERE p.status = 'succeeded' GROUP BY p.id"
            )

        deadline = time.monotonic() + 60
        paid = await credits_for_paid()
        while any(r["credited"] == 0 for r in paid) and time.monotonic() < deadline:
            await asyncio.sleep(1)  # a webhook lost in a failover: retried, or reconciled
            paid = await credits_for_paid()
        succeeded = {r["id"] for r in paid}
        not_once = [(r["id"], r["credited"]) for r in paid if r["credited"] != 1]
        confirmed = {pid for pid, status in storm.confirmed.items() if status == 200}
        if not_once:
            problems.append(f"paid purchases not credited exactly once: {not_once[:5]}")
        if confirmed - succeeded:
            problems.append(f"confirmed but not paid: {sorted(confirmed - succeeded)[:5]}")
        stray = await conn.fetchval(
            "SELECT count(*) FROM credits c WHERE c.external_transaction_id LIKE 'pi_sbx_%' "
            "AND NOT EXISTS (SELECT 1 FROM sandbox_payments p WHERE p.id = "
            "c.external_transaction_id AND p.status = 'succeeded')"
        )
        if stray:
            problems.append(f"credits for payments that did not succeed: {stray}")
        storm.verified = (len(acknowledged), len(rows), len(succeeded), len(confirmed))
    finally:
        await conn.close()
    return problems


def summary(
    storm: Storm,
    rounds: list[Round],
    started: float,
    killed_service: float,
    ended: float,
    audit: str,
    problems: list[str],
    elapsed: float,
) -> str:
    acknowledged, in_ledger, paid, confirmed = storm.verified
    failed = Counter(a.status for a in storm.attempts if a.failed)
    kinds = Counter(a.kind for a in storm.attempts)
    retries = len(storm.attempts) - storm.operations
    lost = sum(1 for p in problems if p.startswith("acknowledged"))
    failed_after_kill = sum(1 for a in storm.attempts if a.failed and a.ended >= killed_service)
    by_kind = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
    errors = ", ".join(f"{status or 'no answer'}: {n}" for status, n in sorted(failed.items()))
    lines = [
        "=" * 78,
        "make test-ha: summary",
        "=" * 78,
        "Topology: etcd; Patroni x2 (PostgreSQL 15, synchronous_mode); HAProxy (DB -> leader via "
        "/primary; HTTP -> 3 x `ciris-billing serve --workers 2`); Redis (REDIS_URL); "
        f"{AGENTS} agents",
        f"Requests: {len(storm.attempts)} attempts ({by_kind})",
        f"Charges answered 201: {acknowledged}; in the new leader's ledger: {in_ledger}; "
        "acknowledged but lost: " + ("SEE BELOW" if lost else "0"),
        f"Paid purchases (sandbox succeeded): {paid} (confirmed 200 to the client: {confirmed}); "
        "each credited exactly once: "
        + ("no" if any("credited" in p for p in problems) else "yes"),
        f"Client-visible errors (retried): {sum(failed.values())} "
        f"({errors or 'none'}); "
        f"retries: {retries}; operations given up: {len(storm.unresolved)}",
    ]
    for r in rounds:
        promoted = r.promoted_at - r.killed_at
        if r.outage is None:
            outage = "no request failed"
        else:
            first, back = r.outage
            outage = (
                f"first failed request +{first - r.killed_at:.1f} s after the kill, first "
                f"success {back - first:.1f} s later (failover time as clients saw it)"
            )
        lines.append(
            f"{r.name}: {r.old.name} -> {r.new.name if r.new else '?'} (the synchronous "
            f"standby) promoted {promoted:.1f} s after the kill; {outage}"
        )
    r1, r2 = rounds
    end1 = r1.outage[1] if r1.outage else r1.promoted_at
    end2 = r2.outage[1] if r2.outage else r2.promoted_at
    lines += [
        "Throughput (successful answers/s, all kinds):",
        f"  before: {storm.throughput(started, r1.killed_at)}; latency p50/p99 ms: "
        f"{storm.latencies(started, r1.killed_at)}",
        f"  round 1, during: {storm.throughput(r1.killed_at, end1)}; "
        f"after: {storm.throughput(end1, r2.killed_at)}",
        f"  round 2, during: {storm.throughput(r2.killed_at, end2)}; "
        f"after: {storm.throughput(end2, killed_service)}",
        f"  one service instance killed: {storm.throughput(killed_service, ended)}; "
        f"failed attempts after the kill (retried): {failed_after_kill}",
        "Service processes restarted by hand: 0 (each reconnected to the new leader by itself)",
        f"Audit on the new leader: {audit.strip().splitlines()[-1] if audit.strip() else '?'}",
        f"Total time: {elapsed:.0f} s",
        "RESULT: " + ("PASS" if not problems else "FAIL\n  " + "\n  ".join(problems)),
    ]
    return "\n".join(lines)


async def storm_and_failovers(cluster: Cluster, run_started: float) -> tuple[str, int]:
    front = f"http://127.0.0.1:{cluster.http_port}"
    key_line = cluster.run_cli("keys", "create", "--name", "test-ha", "--scopes", "admin")
    cluster.api_key = key_line.strip().splitlines()[-1]
    key_id = key_line.split("Created key ", 1)[1].split(" ", 1)[0]
    limits = httpx.Limits(max_connections=AGENTS * 2, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=front, timeout=10, limits=limits) as http:
        users = await create_users(http, cluster.api_key)
        storm = Storm(http, cluster.api_key, users)
        log(f"storm: {AGENTS} agents through {front}")
        started = time.monotonic()
        agents = [asyncio.create_task(storm.agent(n)) for n in range(AGENTS)]
        try:
            await asyncio.sleep(8)
            round1 = await failover_round(cluster, storm, "Round 1 (postgres killed)", False)
            standby = round1.old
            when = await until(
                f"{standby.name} back as synchronous standby", standby.is_sync_standby, 90
            )
            back = when - round1.killed_at
            log(f"{standby.name} is the synchronous standby again ({back:.0f} s after the kill)")
            await asyncio.sleep(3)
            round2 = await failover_round(cluster, storm, "Round 2 (Patroni killed)", True)
            killed_service = time.monotonic()
            log("kill -9 one service instance (svc1): HAProxy routes around it")
            cluster.kill_service("svc1")
            await asyncio.sleep(8)
        finally:
            ended = time.monotonic()
            storm.give_up_at = ended + 30
            storm.stopping.set()
            await asyncio.gather(*agents, return_exceptions=True)
        log(f"storm stopped; {len(storm.attempts)} attempts; verifying on the new leader")
        leader = cluster.leader()
        assert leader is not None
        problems = await verify(cluster, storm, leader, key_id)
        problems += [f"never answered: {u}" for u in storm.unresolved[:5]]
        env_leader = f"{leader.url}/billing"
        audit = await asyncio.to_thread(cluster.run_cli, "audit", database_url=env_leader)
        if "clean" not in audit:
            problems.append(f"audit: {audit.strip()[-300:]}")
    text = summary(
        storm,
        [round1, round2],
        started,
        killed_service,
        ended,
        audit,
        problems,
        time.monotonic() - run_started,
    )
    print(text, flush=True)
    return text, 0 if not problems else 1


def main() -> int:
    run_started = time.monotonic()
    require_programs()

    def bounded(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"test-ha exceeded {BOUND_SECONDS} s")

    def stopped(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGALRM, bounded)
    signal.signal(signal.SIGTERM, stopped)
    signal.alarm(BOUND_SECONDS)
    cluster = Cluster()
    try:
        log(f"cluster in {cluster.home}")
        cluster.start_etcd()
        cluster.start_redis()
        cluster.start_nodes()
        log(f"Patroni: {cluster.nodes[0].name} leader, {cluster.nodes[1].name} synchronous standby")
        cluster.start_haproxy(services=3)
        asyncio.run(create_database(cluster))
        cluster.run_cli("migrate")
        cluster.start_services()
        log("3 service instances up (2 workers each)")
        text, status = asyncio.run(storm_and_failovers(cluster, run_started))
        summary_file = os.environ.get("HA_SUMMARY_FILE")
        if summary_file:
            Path(summary_file).write_text(text + "\n")
        return status
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        log(f"FAILED: {type(exc).__name__}: {exc}")
        for name in ("pg1", "pg2", "haproxy", "svc1", "svc2", "svc3"):
            tail = cluster.log_tail(name, 15)
            if tail:
                print(f"--- {name} (last lines) ---\n{tail}", flush=True)
        return 1
    finally:
        signal.alarm(0)
        log("stopping everything this run started")
        cluster.close()
        log(f"done in {time.monotonic() - run_started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
