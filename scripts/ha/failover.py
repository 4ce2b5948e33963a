"""`make test-ha`: failovers under load, on 127.0.0.1, bounded, with a printed summary.

etcd, two Patroni nodes (PostgreSQL 15, synchronous_mode; Patroni from .venv-ha, cluster.py),
Redis, HAProxy routing database connections to the leader (Patroni's /primary check) and HTTP
over three `ciris-billing serve` instances (2 workers each, REDIS_URL set, the default
JOBS_POLL_SECONDS and RECONCILE_AFTER_SECONDS). A client storm goes through the HTTP front:
credit checks, charges, holds and their captures (all with idempotency keys), purchases paid in
the sandbox, refunds of some of them; an outgoing-webhook endpoint points at a receiver here
that records every event id it gets. Every non-2xx answer (and every broken connection) is
retried with the same key, as the agent client does (429, 5xx, Retry-After honoured). Each
client keeps its own record of what it was acknowledged. Mid-storm, one round after another:

  stall-postgres: SIGSTOP the leader's postgres (postmaster and backends) for 30 s, SIGCONT;
  stall-node:     SIGSTOP the leader's whole node (Patroni and its postgres) for 30 s, SIGCONT;
  kill-postgres:  kill -9 the leader's postgres (Patroni fails over to the synchronous standby);
  kill-patroni:   kill -9 the leader's Patroni (restarted afterwards, as systemd would);
  stall-service:  SIGSTOP one service instance for 20 s, SIGCONT;
  kill-service:   kill -9 one service instance (HAProxy routes around it).

After each round, once the cluster has settled (a leader and its synchronous standby again):
every charge, hold, capture and refund a client was acknowledged so far is looked up in the
leader's ledger; the round prints `acknowledged but lost: N` (the run fails unless 0). At the
end: no charge twice, nothing in the ledger a client was not answered, every paid purchase
credited exactly once, every event in the ledger received by the webhook receiver (and none
received that the ledger lacks), `ciris-billing audit` clean. HA_ROUNDS picks rounds by name
(comma-separated; default all, in the order above). Exit status 0 only if every check holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from cluster import PATRONI, SYNC_STRICT, Cluster, Node, freeze, require_programs, thaw

# The agent client's retry policy (src/ciris_billing/client/_core.py): these statuses and
# broken connections are retried; Retry-After on 429/503 is honoured.
RETRYABLE = frozenset({429, 500, 502, 503, 504})
BOUND_SECONDS = 560  # the whole run, set-up and clean-up included, stays under 10 minutes
AGENTS = 16
USERS = 40
PAID = 1_000_000  # uses granted to each user up front: charges are never refused for lack
CARD = "4242 4242 4242 4242"
DB_STALL_SECONDS = 30
SERVICE_STALL_SECONDS = 20
# Default settings (config.py): a purchase whose webhook was lost is reconciled this late.
RECONCILE_AFTER_SECONDS, JOBS_POLL_SECONDS = 180, 10
ROUNDS = (
    "stall-postgres",
    "stall-node",
    "kill-postgres",
    "kill-patroni",
    "stall-service",
    "kill-service",
)


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
class Acknowledged:
    """What the clients were answered 2xx: their own record, checked against the ledger."""

    charges: dict[str, str] = field(default_factory=dict)  # idempotency key: charge id
    holds: dict[str, str] = field(default_factory=dict)  # idempotency key: reservation id
    captures: dict[str, tuple[str, str]] = field(default_factory=dict)  # key: (hold, charge)
    refunds: dict[str, tuple[str, int]] = field(default_factory=dict)  # key: (payment, total)
    paid: set[str] = field(default_factory=set)  # sandbox payments confirmed 200
    answered: set[str] = field(default_factory=set)  # every key answered, whatever the status

    def total(self) -> int:
        return (
            len(self.charges)
            + len(self.holds)
            + len(self.captures)
            + len(self.refunds)
            + len(self.paid)
        )


@dataclass
class Storm:
    http: httpx.AsyncClient
    key: str
    users: list[dict[str, str]]
    attempts: list[Attempt] = field(default_factory=list)
    acked: Acknowledged = field(default_factory=Acknowledged)
    unresolved: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    give_up_at: float = float("inf")
    operations: int = 0

    async def call(
        self, kind: str, path: str, body: Mapping[str, object], key: str | None = None
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
                if key is not None:
                    self.acked.answered.add(key)
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
            if answer is not None and answer.status_code == 201:
                self.acked.charges[key] = answer.json()["charge_id"]
            if n % 3 == 0:
                await self.hold_and_capture(user, f"ha-hold-{number}-{n}")
            if n % 10 == 0:
                await self.buy(user, f"ha-buy-{number}-{n}", refund=n % 20 == 0)

    async def hold_and_capture(self, user: dict[str, str], key: str) -> None:
        held = await self.call(
            "hold", "/v1/billing/reservations", {**user, "uses": 2, "ttl_seconds": 600}, key
        )
        if held is None or held.status_code != 201:
            return
        hold_id = held.json()["reservation_id"]
        self.acked.holds[key] = hold_id
        capture_key = key.replace("ha-hold-", "ha-capture-")
        captured = await self.call(
            "capture",
            f"/v1/billing/reservations/{hold_id}/capture",
            {"uses": 1, "description": capture_key},
            capture_key,
        )
        if captured is not None and captured.status_code in (200, 201):
            self.acked.captures[capture_key] = (hold_id, captured.json()["charge_id"])

    async def buy(self, user: dict[str, str], key: str, refund: bool) -> None:
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
        if paid is None or paid.status_code != 200:
            return
        self.acked.paid.add(purchase["payment_id"])
        if refund:
            refund_key = key.replace("ha-buy-", "ha-refund-")
            refunded = await self.call(
                "refund",
                f"/v1/billing/purchases/{purchase['payment_id']}/refund",
                {"amount_minor": 100},
                refund_key,
            )
            if refunded is not None and refunded.status_code == 201:
                total = int(refunded.json()["refunded_minor"])
                self.acked.refunds[refund_key] = (purchase["payment_id"], total)

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

    def throughput(self, start: float, end: float, kinds: frozenset[str] | None = None) -> float:
        if end <= start:
            return 0.0
        ok = sum(
            1
            for a in self.attempts
            if a.ok and start <= a.ended < end and (kinds is None or a.kind in kinds)
        )
        return ok / (end - start)

    def longest_gap(self, start: float, end: float, kinds: frozenset[str]) -> float:
        """The longest time between two successful answers of `kinds` in [start, end]: how
        long writes stood still."""
        moments = sorted(
            a.ended for a in self.attempts if a.ok and a.kind in kinds and start <= a.ended <= end
        )
        edges = [start, *moments, end]
        return max(b - a for a, b in itertools.pairwise(edges))


WRITES = frozenset({"charge", "hold", "capture"})


class Receiver:
    """The outgoing-webhook endpoint: a bare HTTP/1.1 server on loopback that answers 200 to
    every POST and records its `webhook-id` (the event's id)."""

    def __init__(self) -> None:
        self.event_ids: Counter[str] = Counter()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                if "webhook-id" in headers:
                    self.event_ids[headers["webhook-id"]] += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


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


async def lost_now(leader: Node, acked: Acknowledged, key_id: str) -> list[str]:
    """Everything the clients were acknowledged so far that the leader's ledger does not hold
    as answered (one line per kind with losses; none: nothing lost)."""
    charges = dict(acked.charges)
    holds = dict(acked.holds)
    captures = dict(acked.captures)
    refunds = dict(acked.refunds)
    paid = sorted(acked.paid)
    conn = await asyncpg.connect(f"{leader.url}/billing", timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_key, id FROM charges WHERE api_key_id = $1 "
            "AND idempotency_key LIKE 'ha-c%'",
            key_id,
        )
        charged = {row["idempotency_key"]: row["id"] for row in rows}
        rows = await conn.fetch(
            "SELECT idempotency_key, id, charge_id FROM reservations WHERE api_key_id = $1",
            key_id,
        )
        held = {row["idempotency_key"]: row["id"] for row in rows}
        hold_charge = {row["id"]: row["charge_id"] for row in rows}
        rows = await conn.fetch(
            "SELECT payment_id, refunded_minor FROM purchases WHERE payment_id = ANY($1::text[])",
            [payment for payment, _ in refunds.values()],
        )
        refunded = {row["payment_id"]: row["refunded_minor"] for row in rows}
        # A capture's charge carries no key of its own (the key's answer is recorded).
        captured = {
            row["id"]
            for row in await conn.fetch(
                "SELECT id FROM charges WHERE id = ANY($1::text[])",
                [cid for _, cid in captures.values()],
            )
        }
        succeeded = {
            row["id"]
            for row in await conn.fetch(
                "SELECT id FROM sandbox_payments WHERE id = ANY($1::text[]) "
                "AND status = 'succeeded'",
                paid,
            )
        }
    finally:
        await conn.close()
    lost = {
        "charges": [k for k, cid in charges.items() if charged.get(k) != cid],
        "holds": [k for k, hid in holds.items() if held.get(k) != hid],
        "captures": [
            k
            for k, (hid, cid) in captures.items()
            if cid not in captured or hold_charge.get(hid) != cid
        ],
        "payments": [pid for pid in paid if pid not in succeeded],
        "refunds": [k for k, (pid, total) in refunds.items() if refunded.get(pid, 0) < total],
    }
    return [f"{kind} {len(keys)} ({keys[:3]})" for kind, keys in lost.items() if keys]


@dataclass
class Round:
    name: str
    started: float
    old: str
    new: str = ""
    promoted_at: float = float("nan")
    resumed_at: float = float("nan")
    settled_at: float = float("nan")
    outage: tuple[float, float] | None = None
    acknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    write_gap: float = 0.0

    def lost_count(self) -> int:
        return sum(int(line.split()[1]) for line in self.lost)


@dataclass
class Run:
    cluster: Cluster
    storm: Storm
    key_id: str
    run_started: float
    rounds: list[Round] = field(default_factory=list)
    figures: dict[str, int] = field(default_factory=dict)
    patroni_version: str = "?"
    problems: list[str] = field(default_factory=list)
    unsettled: bool = False  # a round left the cluster without a synchronous standby

    async def settled(self, what: str) -> Node:
        """A leader and the other node its synchronous standby (Patroni's REST API)."""

        def ready() -> bool:
            leader = self.cluster.leader()
            return leader is not None and all(
                node.is_sync_standby() for node in self.cluster.nodes if node is not leader
            )

        try:
            await until(f"{what}: a leader with its synchronous standby", ready, 120)
        except TimeoutError as exc:
            # Still counted against whichever node leads: what it lacks is what was lost.
            self.problems.append(str(exc))
            self.unsettled = True
            await until(f"{what}: a leader", lambda: self.cluster.leader() is not None, 30)
        leader = self.cluster.leader()
        assert leader is not None
        return leader

    async def recovered(self, what: str, since: float) -> None:
        """Until requests sent after the first failure since `since` succeed again for 3 s."""

        def back() -> bool:
            outage = self.storm.outage(since)
            return outage is None or (outage[1] == outage[1] and time.monotonic() > outage[1] + 3)

        try:
            await until(f"{what}: the service recovered", back, 90)
        except TimeoutError as exc:
            self.problems.append(str(exc))

    async def check(self, done: Round, leader: Node) -> None:
        done.outage = self.storm.outage(done.started)
        done.acknowledged = self.storm.acked.total()
        done.lost = await lost_now(leader, self.storm.acked, self.key_id)
        done.write_gap = self.storm.longest_gap(done.started, time.monotonic(), WRITES)
        self.rounds.append(done)
        log(
            f"{done.name}: {done.acknowledged} acknowledged so far; acknowledged but lost: "
            f"{done.lost_count()}{' ' + '; '.join(done.lost) if done.lost else ''}"
        )

    async def database_round(self, name: str) -> None:
        cluster = self.cluster
        old = await self.settled(f"before {name}")
        other = next(node for node in cluster.nodes if node is not old)
        postmaster = old.postmaster_pid()
        assert postmaster is not None
        assert old.patroni is not None
        done = Round(name, time.monotonic(), old.name)
        roots: list[int] = []
        if name == "stall-postgres":
            roots = [postmaster]
            log(f"{name}: SIGSTOP {old.name}'s postgres (postmaster and backends) for 30 s")
        elif name == "stall-node":
            roots = [old.patroni.pid, postmaster]
            log(f"{name}: SIGSTOP {old.name}'s Patroni and postgres for 30 s")
        elif name == "kill-postgres":
            log(f"{name}: kill -9 {old.name}'s postmaster (pid {postmaster})")
            os.kill(postmaster, signal.SIGKILL)
        else:
            log(f"{name}: kill -9 {old.name}'s Patroni (pid {old.patroni.pid})")
            os.kill(old.patroni.pid, signal.SIGKILL)
            old.patroni.wait()
        stalled = name.startswith("stall")
        pids = freeze(*roots) if stalled else []
        try:
            done.promoted_at = await until(f"{name}: {other.name} promoted", other.is_leader, 60)
            done.new = other.name
            log(f"{name}: {other.name} is the leader after {done.promoted_at - done.started:.1f} s")
            if stalled:
                await asyncio.sleep(max(0.0, done.started + DB_STALL_SECONDS - time.monotonic()))
        finally:
            if stalled:
                thaw(pids)
        if stalled:
            done.resumed_at = time.monotonic()
            log(f"{name}: SIGCONT {old.name} after {done.resumed_at - done.started:.1f} s")
        if name == "kill-patroni":
            cluster.start_patroni(old)  # as systemd would: it rejoins as a standby
        # The leader once it settles: a woken node that took the leader key back (Patroni
        # 3.0.2) would show here, and the writes made meanwhile would be missing from it.
        await asyncio.sleep(5)
        leader = await self.settled(name)
        done.settled_at = time.monotonic()
        done.new = leader.name
        log(
            f"{name}: {leader.name} leads, {old.name if leader is other else other.name} is its "
            f"synchronous standby ({done.settled_at - done.started:.0f} s after the fault)"
        )
        await self.recovered(name, done.started)
        await self.check(done, leader)

    async def service_round(self, name: str) -> None:
        done = Round(name, time.monotonic(), "svc1")
        if name == "stall-service":
            log(f"{name}: SIGSTOP one service instance (svc1) for {SERVICE_STALL_SECONDS} s")
            pids = self.cluster.stop_service("svc1")
            try:
                await asyncio.sleep(SERVICE_STALL_SECONDS)
            finally:
                thaw(pids)
            done.resumed_at = time.monotonic()
            log(f"{name}: SIGCONT svc1")
        else:
            log(f"{name}: kill -9 one service instance (svc1): HAProxy routes around it")
            self.cluster.kill_service("svc1")
            await asyncio.sleep(8)
        await self.recovered(name, done.started)
        leader = await self.settled(name)
        done.new = leader.name
        await self.check(done, leader)


async def verify_end(run: Run, receiver: Receiver, endpoint_id: str, leader: Node) -> list[str]:
    """The checks at the end, on the leader's own data; each problem as a line."""
    storm, problems = run.storm, []
    conn = await asyncpg.connect(f"{leader.url}/billing", timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_key, count(*) AS n FROM charges WHERE api_key_id = $1 "
            "AND idempotency_key LIKE 'ha-c%' GROUP BY idempotency_key",
            run.key_id,
        )
        twice = [row["idempotency_key"] for row in rows if row["n"] > 1]
        unanswered = [row["idempotency_key"] for row in rows if row["idempotency_key"] not in
                      storm.acked.answered]  # fmt: skip
        if twice:
            problems.append(f"charges applied twice: {twice[:5]}")
        if unanswered:
            problems.append(f"charges in the ledger never answered: {unanswered[:5]}")

        async def credits_for_paid() -> list[asyncpg.Record]:
            found: list[asyncpg.Record] = await conn.fetch(
                "SELECT p.id, count(c.id) AS credited FROM sandbox_payments p "
                "LEFT JOIN credits c ON c.external_transaction_id = p.id AND c.kind = 'purchase' "
                "WHERE p.status IN ('succeeded', 'refunded', 'partially_refunded') GROUP BY p.id"
            )
            return found

        # A webhook lost in a failover is reconciled RECONCILE_AFTER_SECONDS after the
        # purchase, at the next job run.
        deadline = time.monotonic() + RECONCILE_AFTER_SECONDS + 2 * JOBS_POLL_SECONDS + 10
        paid = await credits_for_paid()
        while any(r["credited"] == 0 for r in paid) and time.monotonic() < deadline:
            await asyncio.sleep(2)
            paid = await credits_for_paid()
        succeeded = {r["id"] for r in paid}
        not_once = [(r["id"], r["credited"]) for r in paid if r["credited"] != 1]
        if not_once:
            problems.append(f"paid purchases not credited exactly once: {not_once[:5]}")
        if storm.acked.paid - succeeded:
            problems.append(f"confirmed but not paid: {sorted(storm.acked.paid - succeeded)[:5]}")

        async def undelivered() -> tuple[set[str], set[str]]:
            ids = {
                row["id"]
                for row in await conn.fetch(
                    "SELECT id FROM events WHERE created_at >= "
                    "(SELECT created_at FROM webhook_endpoints WHERE id = $1)",
                    endpoint_id,
                )
            }
            return ids - set(receiver.event_ids), set(receiver.event_ids) - ids

        deadline = time.monotonic() + 60
        missing, unknown = await undelivered()
        while missing and time.monotonic() < deadline:
            await asyncio.sleep(2)
            missing, unknown = await undelivered()
        if missing:
            problems.append(f"events never received by the webhook receiver: {len(missing)}")
        if unknown:
            problems.append(f"events received that the ledger lacks (lost): {len(unknown)}")
        run.figures = {
            "paid": len(succeeded),
            "confirmed": len(storm.acked.paid),
            "events": len(receiver.event_ids),
            "redelivered": sum(receiver.event_ids.values()) - len(receiver.event_ids),
        }
    finally:
        await conn.close()
    return problems


def summary(run: Run, started: float, ended: float, audit: str, problems: list[str]) -> str:
    storm, acked, figures = run.storm, run.storm.acked, run.figures
    failed = Counter(a.status for a in storm.attempts if a.failed)
    kinds = Counter(a.kind for a in storm.attempts)
    retries = len(storm.attempts) - storm.operations
    by_kind = ", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items()))
    errors = ", ".join(f"{status or 'no answer'}: {n}" for status, n in sorted(failed.items()))
    lost = sum(r.lost_count() for r in run.rounds)
    lines = [
        "=" * 78,
        "make test-ha: summary",
        "=" * 78,
        f"Topology: etcd; Patroni x2 ({Path(PATRONI).name} {run.patroni_version}, PostgreSQL 15, "
        f"synchronous_mode{'_strict' if SYNC_STRICT else ''}); HAProxy (DB -> leader via "
        "/primary; HTTP -> 3 x `ciris-billing serve --workers 2`, /health check); Redis; "
        f"{AGENTS} agents; JOBS_POLL_SECONDS and RECONCILE_AFTER_SECONDS at their defaults",
        f"Requests: {len(storm.attempts)} attempts ({by_kind})",
        f"Acknowledged (the clients' own record): charges {len(acked.charges)}, holds "
        f"{len(acked.holds)}, captures {len(acked.captures)}, refunds {len(acked.refunds)}, "
        f"payments confirmed {len(acked.paid)}",
        f"Paid purchases (sandbox succeeded): {figures.get('paid', '?')}; each credited exactly "
        "once: " + ("no" if any("credited" in p for p in problems) else "yes"),
        f"Outgoing webhooks: {figures.get('events', '?')} event ids received (every event in "
        f"the ledger: {'no' if any('webhook' in p for p in problems) else 'yes'}; received "
        f"again: {figures.get('redelivered', '?')})",
        f"Client-visible errors (retried): {sum(failed.values())} ({errors or 'none'}); "
        f"retries: {retries}; operations given up: {len(storm.unresolved)}",
        "Rounds (writes = charges, holds, captures; gap = longest time without a successful "
        "write from the fault until the round's check):",
    ]
    for r in run.rounds:
        if r.outage is None:
            outage = "no request failed"
        else:
            first, back = r.outage
            outage = f"clients' outage {back - first:.1f} s"
        promoted = (
            f"{r.new} promoted +{r.promoted_at - r.started:.1f} s, "
            if r.promoted_at == r.promoted_at
            else ""
        )
        resumed = (
            f"resumed +{r.resumed_at - r.started:.0f} s, " if r.resumed_at == r.resumed_at else ""
        )
        lines.append(
            f"  {r.name} ({r.old}): {promoted}{resumed}{outage}, write gap {r.write_gap:.1f} s, "
            f"leader after: {r.new}; acknowledged but lost: {r.lost_count()}"
        )
    first = run.rounds[0].started if run.rounds else ended
    lines += [
        f"Throughput before the first round: {storm.throughput(started, first):,.0f}/s; "
        f"latency p50/p99 ms: {storm.latencies(started, first)}",
        f"Acknowledged but lost: {lost} (every round, against the leader's ledger)",
        f"Audit on the leader: {audit.strip().splitlines()[-1] if audit.strip() else '?'}",
        f"Total time: {ended - run.run_started:.0f} s",
        "RESULT: " + ("PASS" if not problems else "FAIL\n  " + "\n  ".join(problems)),
    ]
    return "\n".join(lines)


async def storm_and_rounds(
    cluster: Cluster, run_started: float, names: list[str]
) -> tuple[str, int]:
    front = f"http://127.0.0.1:{cluster.http_port}"
    key_line = cluster.run_cli("keys", "create", "--name", "test-ha", "--scopes", "admin")
    cluster.api_key = key_line.strip().splitlines()[-1]
    key_id = key_line.split("Created key ", 1)[1].split(" ", 1)[0]
    receiver = Receiver()
    await receiver.start()
    limits = httpx.Limits(max_connections=AGENTS * 2, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=front, timeout=10, limits=limits) as http:
        made = await http.post(
            "/v1/billing/webhook_endpoints",
            json={"url": f"http://127.0.0.1:{receiver.port}/events"},
            headers={"X-API-Key": cluster.api_key},
        )
        if made.status_code != 201:
            raise RuntimeError(f"webhook endpoint: {made.status_code} {made.text}")
        endpoint_id = made.json()["id"]
        users = await create_users(http, cluster.api_key)
        storm = Storm(http, cluster.api_key, users)
        run = Run(cluster, storm, key_id, run_started=run_started)
        run.patroni_version = patroni_version()
        log(f"storm: {AGENTS} agents through {front}; webhooks to :{receiver.port}")
        started = time.monotonic()
        agents = [asyncio.create_task(storm.agent(n)) for n in range(AGENTS)]
        problems = run.problems
        try:
            await asyncio.sleep(8)
            for name in names:
                if name.endswith("service"):
                    await run.service_round(name)
                else:
                    await run.database_round(name)
                if run.unsettled:
                    log(f"{name}: the cluster did not settle; no further rounds")
                    break
                await asyncio.sleep(3)
        finally:
            ended = time.monotonic()
            storm.give_up_at = ended + 30
            storm.stopping.set()
            await asyncio.gather(*agents, return_exceptions=True)
        log(f"storm stopped; {len(storm.attempts)} attempts; verifying on the leader")
        leader = await run.settled("the end")
        final = Round("end of storm", ended, leader.name, new=leader.name)
        await run.check(final, leader)
        problems += [
            f"{r.name}: acknowledged but lost: {'; '.join(r.lost)}" for r in run.rounds if r.lost
        ]
        run.rounds.remove(final)
        problems += await verify_end(run, receiver, endpoint_id, leader)
        problems += [f"never answered: {u}" for u in storm.unresolved[:5]]
        receiver.close()
        audit = await asyncio.to_thread(
            cluster.run_cli, "audit", database_url=f"{leader.url}/billing"
        )
        if "clean" not in audit:
            problems.append(f"audit: {audit.strip()[-300:]}")
    text = summary(run, started, time.monotonic(), audit, problems)
    print(text, flush=True)
    return text, 0 if not problems else 1


def patroni_version() -> str:
    import subprocess

    done = subprocess.run([PATRONI, "--version"], capture_output=True, text=True, check=False)  # noqa: S603
    return done.stdout.strip().split()[-1] if done.stdout.strip() else "?"


def main() -> int:
    run_started = time.monotonic()
    require_programs()
    names = [n for n in os.environ.get("HA_ROUNDS", ",".join(ROUNDS)).split(",") if n]
    unknown = sorted(set(names) - set(ROUNDS))
    if unknown:
        sys.exit(f"HA_ROUNDS: unknown {unknown}; known: {', '.join(ROUNDS)}")

    def bounded(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"test-ha exceeded {BOUND_SECONDS} s")

    def stopped(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGALRM, bounded)
    signal.signal(signal.SIGTERM, stopped)
    signal.alarm(BOUND_SECONDS)
    cluster = Cluster()
    try:
        log(f"cluster in {cluster.home}; rounds: {', '.join(names)}")
        cluster.start_etcd()
        cluster.start_redis()
        cluster.start_nodes()
        log(f"Patroni: {cluster.nodes[0].name} leader, {cluster.nodes[1].name} synchronous standby")
        cluster.start_haproxy(services=3)
        asyncio.run(create_database(cluster))
        cluster.run_cli("migrate")
        cluster.start_services()
        log("3 service instances up (2 workers each)")
        text, status = asyncio.run(storm_and_rounds(cluster, run_started, names))
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
