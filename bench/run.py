"""The hot path against PostgreSQL's own limit: `make bench` (see bench/README.md).

One run, on this machine, over loopback only: a fresh PostgreSQL database with seeded accounts;
pgbench running the service's own charge and check SQL (the physical limit); a bare FastAPI
"hello" app (the HTTP ceiling); then `ciris-billing serve --workers 2` driven by wrk. Prints one
table, the audit, and writes bench/RESULTS.md. The bench database is dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
from pgbench_scripts import write_scripts

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BIN = ROOT / ".venv" / "bin"
PSQL, PGBENCH, WRK = "/usr/bin/psql", "/usr/bin/pgbench", "/usr/bin/wrk"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
# One database per run (its process id): two runs on one PostgreSQL (several checkouts on one
# machine) never drop or seed each other's.
DB, GROWTH_DB = f"ciris_billing_bench_{os.getpid()}", f"ciris_billing_bench_growth_{os.getpid()}"
ACCOUNTS, GROWTH_ACCOUNTS = 10_000, 1_000_000
# Charges over the first 1,000 accounts only: at 64 connections the two workers' batches share
# accounts all the time (the lock-order scenario: overlapping batches must never deadlock).
OVERLAP_ACCOUNTS = 1_000
FREE_USES, PAID_USES = 3, 1_000_000  # every account can pay for every charge of the run
CONNECTIONS = (8, 64)
TICKS = os.sysconf("SC_CLK_TCK")


def run(
    cmd: Sequence[str], env: dict[str, str] | None = None, timeout: float = 3600, check: bool = True
) -> str:
    """Run a command to completion; its stdout, or an error carrying its output."""
    done = subprocess.run(  # noqa: S603 (fixed programs, our own arguments)
        list(cmd), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def psql(sql: str, db: str = "postgres") -> str:
    return run([PSQL, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", f"{PG_SERVER}/{db}", "-c", sql])


def ensure_wrk() -> None:
    if Path(WRK).exists():
        return
    apt = ["/usr/bin/apt-get", "install", "-y", "wrk"]
    try:
        run(apt)
    except RuntimeError:
        run(["/usr/bin/apt-get", "update"])
        run(apt)


# ---------------------------------------------------------------------------------- database


PROMO_USES = 1_000  # --lots: each account's expiring promotional lot, consumed first


def seed_sql(accounts: int, history: bool, lots: bool = False) -> str:
    """Accounts bench-0 (the hot one) .. bench-N, each with its lots, its wallet (ledger/rules.py)
    and its ledger rows, so audit is clean: a free lot (FREE_USES) and a paid lot (PAID_USES).
    With `lots`, also a promotional lot of PROMO_USES that expires in 30 days, at priority 50:
    first in the consumption order, and the account's next_expiry_at is set.

    With `history`, account n also has n % 7 past charges of one use (by the rule: the free lot
    first, then the paid one; with `lots` the promotional lot): about 3 charges per account, so
    1M accounts carry ~3M charges + 2M credits = ~5M ledger rows.
    """
    k = "(n % 7)" if history else "0"
    # What the history took from each lot.
    promo_spent = k if lots else "0"
    free_spent = "0" if lots else f"least({k}, {FREE_USES})"
    paid_spent = "0" if lots else f"greatest({k} - {FREE_USES}, 0)"
    expiry = "date_trunc('second', now()) + interval '30 days'"
    promo_ids = "ARRAY['lot_bench_x_' || n]" if lots else "ARRAY[]::text[]"
    promo_left = f"ARRAY[{PROMO_USES} - {promo_spent}]::bigint[]" if lots else "ARRAY[]::bigint[]"
    promo_kinds = "ARRAY[1]::smallint[]" if lots else "ARRAY[]::smallint[]"
    promo_expires = f"ARRAY[{expiry}]" if lots else "ARRAY[]::timestamptz[]"
    promo_credit = f"('grant', 0, {PROMO_USES})," if lots else ""
    promo_lot = (
        f"""('x', 'promotional', 'grant', 50, {expiry}, {PROMO_USES}, 0, NULL, 'grant'),"""
        if lots
        else ""
    )
    charged_lot = "'x'" if lots else f"CASE WHEN i <= {FREE_USES} THEN 'f' ELSE 'p' END"
    charged_free = "0" if lots else f"(i <= {FREE_USES})::int"
    return f"""
    INSERT INTO accounts (id, oauth_provider, external_id, plan_name, currency, status,
        free_uses_remaining, paid_uses_remaining, total_uses, last_charge_free_uses,
        lot_ids, lot_left, lot_kinds, lot_expires, next_expiry_at, created_at, updated_at)
    SELECT 'acct_bench_' || n, 'oauth:google', 'bench-' || n || '@example.com', 'free', 'USD',
        'active', {FREE_USES} - {free_spent},
        {PAID_USES} - {paid_spent} + {PROMO_USES if lots else 0} - {promo_spent}, {k}, 0,
        {promo_ids} || ARRAY['lot_bench_f_' || n, 'lot_bench_p_' || n],
        {promo_left} || ARRAY[{FREE_USES} - {free_spent}, {PAID_USES} - {paid_spent}]::bigint[],
        {promo_kinds} || ARRAY[0, 2]::smallint[],
        {promo_expires} || ARRAY[NULL, NULL]::timestamptz[],
        {expiry if lots else "NULL"}, now(), now()
    FROM generate_series(0, {accounts}) AS n;
    INSERT INTO credits (id, account_id, kind, free_uses_delta, paid_uses_delta, amount_minor,
        currency, description, created_at)
    SELECT 'cr_bench_' || g.kind || '_' || n, 'acct_bench_' || n, g.kind, g.free, g.paid, 0,
        'USD', 'bench seed', now() - interval '2 days'
    FROM generate_series(0, {accounts}) AS n,
        (VALUES {promo_credit} ('free_grant', {FREE_USES}, 0),
                ('initial_balance', 0, {PAID_USES})) AS g(kind, free, paid);
    INSERT INTO lots (id, account_id, kind, source, priority, expires_at, uses_granted,
        amount_minor, currency, cost_basis_minor, credit_id, status, created_at)
    SELECT 'lot_bench_' || l.tag || '_' || n, 'acct_bench_' || n, l.kind, l.source, l.priority,
        l.expires_at, l.uses, l.amount, 'USD', l.basis, 'cr_bench_' || l.credit || '_' || n,
        'active', now() - interval '2 days'
    FROM generate_series(0, {accounts}) AS n,
        (VALUES {promo_lot}
                ('f', 'free', 'free_grant', 100, NULL::timestamptz, {FREE_USES}, 0, NULL::bigint,
                 'free_grant'),
                ('p', 'paid', 'initial_balance', 100, NULL, {PAID_USES}, 0, 0, 'initial_balance'))
        AS l(tag, kind, source, priority, expires_at, uses, amount, basis, credit);
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
        currency, description, metadata, idempotency_key, lot_ids, lot_uses, created_at)
    SELECT 'ch_bench_' || n || '_' || i, 'acct_bench_' || n, 1,
        {charged_free}, 1 - {charged_free}, 100, 'USD', 'bench seed', '{{}}', NULL,
        ARRAY['lot_bench_' || {charged_lot} || '_' || n], ARRAY[1]::bigint[],
        now() - interval '1 day'
    FROM generate_series(0, {accounts}) AS n, generate_series(1, {k}) AS i;
    """  # noqa: S608 (our own numbers, no input)


def create_database(db: str, accounts: int, history: bool, lots: bool = False) -> str:
    """A fresh, migrated, seeded database (`lots`: an expiring promotional lot first in every
    account's wallet); returns a write-scoped API key for it."""
    drop_database(db)
    psql(f"CREATE DATABASE {db}")
    env = service_env(db)
    run([str(BIN / "ciris-billing"), "migrate"], env=env)
    psql(seed_sql(accounts, history, lots), db)
    psql("VACUUM ANALYZE", db)
    output = run(
        [str(BIN / "ciris-billing"), "keys", "create", "--name", "bench", "--scopes", "write"],
        env=env,
    )
    return output.strip().splitlines()[-1]


def drop_database(db: str) -> None:
    psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


# Rate limits are policy, not cost: raised far above what wrk sends (the hot account would get
# 429s past 10 charges/s per worker), while their token buckets still run on every request.
SERVICE_SETTINGS = {
    "LOG_LEVEL": "WARNING",
    "RATE_LIMIT_KEY_PER_SECOND": "1000000",
    "RATE_LIMIT_ACCOUNT_PER_MINUTE": "100000000",
}


def service_env(
    db: str, metrics_dir: str | None = None, redis_url: str | None = None
) -> dict[str, str]:
    env = dict(os.environ, DATABASE_URL=f"{PG_SERVER}/{db}", **SERVICE_SETTINGS)
    env.pop("REDIS_URL", None)  # per-process limits unless asked (--redis-url)
    if redis_url:
        env["REDIS_URL"] = redis_url
    if metrics_dir:
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    return env


def total_uses(db: str, n: int) -> int:
    return int(psql(f"SELECT total_uses FROM accounts WHERE id = 'acct_bench_{n:d}'", db))  # noqa: S608


# ------------------------------------------------------------------------------- processes


def _stat(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from `state` on


def descendants(root: int) -> list[int]:
    """`root` and every live process below it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, ValueError):
                continue
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def cpu_seconds(root: int | None) -> float:
    """CPU time of a process tree: live processes, plus the root's reaped children."""
    if root is None:
        return 0.0
    ticks = 0
    for pid in descendants(root):
        try:
            fields = _stat(pid)
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        if pid == root:
            ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / TICKS


def postmaster_pid() -> int:
    data_dir = psql("SHOW data_directory")
    return int(Path(data_dir.strip(), "postmaster.pid").read_text().split()[0])


def worker_rss_mb(server: int) -> dict[int, float]:
    """VmRSS of each uvicorn worker (the server's children, not multiprocessing's helpers)."""
    rss = {}
    for pid in descendants(server)[1:]:
        try:
            if b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if match:
            rss[pid] = int(match.group(1)) / 1024
    return rss


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def serving(cmd: list[str], env: dict[str, str], url: str) -> Iterator[int]:
    """Start a server in its own process group, wait until `url` answers, stop it after."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(  # noqa: S603 (our own venv's programs)
            cmd, env=env, cwd=BENCH, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 60
            while not healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"server did not start:\n{log.read().decode()[-3000:]}")
                time.sleep(0.3)
            yield proc.pid
        finally:
            stop_group(proc)


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we started (the server and its workers), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


# ------------------------------------------------------------------------------- measuring


@dataclass
class Row:
    scenario: str
    connections: int
    rps: float
    p50: float  # milliseconds
    p90: float
    p99: float
    errors: int
    server_cpu: float | None  # % of one core (200% = both cores)
    db_cpu: float | None
    successes: int = 0
    ratio: str = ""


class Meter:
    """Wall time and CPU of the server's and PostgreSQL's process trees over one measurement."""

    def __init__(self, server: int | None) -> None:
        self.server, self.postmaster = server, postmaster_pid()

    def __enter__(self) -> Meter:
        self.start = time.monotonic()
        self.cpu = (cpu_seconds(self.server), cpu_seconds(self.postmaster))
        return self

    def __exit__(self, *_exc: object) -> None:
        wall = time.monotonic() - self.start
        self.server_cpu = (cpu_seconds(self.server) - self.cpu[0]) / wall * 100
        self.db_cpu = (cpu_seconds(self.postmaster) - self.cpu[1]) / wall * 100


def wrk(
    name: str,
    url: str,
    key: str,
    mode: str,
    connections: int,
    duration: int,
    server: int,
    *,
    accounts: int = ACCOUNTS,
    limit: int = 0,
    idempotency: str = "",
) -> Row:
    """Drive `url` with bench/billing.lua. With `limit`, stop after about that many responses."""
    threads = 2
    per_thread = -(-limit // threads)
    cmd = [WRK, *f"-t{threads} -c{connections} -d{duration}s --timeout 10s".split()]
    cmd += ["-s", str(BENCH / "billing.lua"), "-H", f"X-API-Key: {key}"]
    cmd += ["-H", "Content-Type: application/json", url, "--", mode, str(accounts), str(per_thread)]
    cmd += [idempotency] if idempotency else []
    with (
        Meter(server) as meter,
        subprocess.Popen(  # noqa: S603 (wrk with our own arguments)
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        ) as proc,
    ):
        try:
            if limit:
                # Each thread writes one line when its share is done; then end wrk's sleep.
                assert proc.stderr is not None
                finished = 0
                while finished < threads and (line := proc.stderr.readline()):
                    finished += "wrk-thread-done" in line
                proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=duration + 60)
        finally:
            if proc.poll() is None:  # interrupted: leave no load generator behind
                proc.kill()
    match = re.search(r"^BENCH_RESULT (\{.*\})$", out, re.M)
    if proc.returncode != 0 or not match:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out}\n{err}")
    r = json.loads(match.group(1))
    errors = r["status_errors"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    rps = r["requests"] / (r["duration_us"] / 1e6)
    p50, p90, p99 = (r[p] / 1000 for p in ("p50", "p90", "p99"))
    row = Row(name, connections, rps, p50, p90, p99, errors, meter.server_cpu, meter.db_cpu)
    row.successes = r["requests"] - r["status_errors"]
    return row


def pgbench(
    name: str, db: str, scripts: list[Path], connections: int, duration: int, accounts: range
) -> Row:
    """pgbench with the service's statements; latency percentiles from its per-transaction log."""
    with tempfile.TemporaryDirectory() as logs:
        options = f"-h 127.0.0.1 -U postgres -n -M prepared -c {connections} -j 2 -T {duration}"
        cmd = [PGBENCH, *options.split(), "-l", "--sampling-rate=0.2", f"--log-prefix={logs}/tx"]
        cmd += f"-D provider=oauth:google -D lo={accounts[0]} -D hi={accounts[-1]}".split()
        for script in scripts:
            cmd += ["-f", f"{script}@1"]
        with Meter(None) as meter:
            out = run([*cmd, db], timeout=duration + 120)
        fields = (line.split() for log in Path(logs).iterdir() for line in log.open())
        latencies = sorted(int(f[2]) for f in fields if f[2].isdigit())  # not "failed"/"skipped"
    tps = re.search(r"tps = ([\d.]+) \(without initial", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if not tps:
        raise RuntimeError(f"pgbench printed no tps:\n{out}")
    p50, p90, p99 = (percentile(latencies, p) / 1000 for p in (50, 90, 99))
    errors = int(failed.group(1)) if failed else 0
    return Row(name, connections, float(tps.group(1)), p50, p90, p99, errors, None, meter.db_cpu)


def percentile(values: list[int], p: float) -> float:
    return float(values[min(len(values) - 1, int(len(values) * p / 100))]) if values else 0.0


# ------------------------------------------------------------------------------- the run


def references(duration: int) -> dict[tuple[str, int], Row]:
    """pgbench on the bench database and the bare hello app: what the service is compared to."""
    refs: dict[tuple[str, int], Row] = {}
    random_accounts, hot = range(1, ACCOUNTS + 1), range(1)
    overlapping = range(1, OVERLAP_ACCOUNTS + 1)
    with tempfile.TemporaryDirectory() as directory:
        sql = write_scripts(Path(directory))
        check, charge = sql["check.sql"], sql["charge.sql"]
        for label, scripts, accounts in (
            ("pgbench check", [check], random_accounts),
            ("pgbench charge", [charge], random_accounts),
            ("pgbench charge hot", [charge], hot),
            ("pgbench charge 1k", [charge], overlapping),
            ("pgbench mix", [check, charge], random_accounts),
        ):
            for c in CONNECTIONS:
                refs[label, c] = pgbench(label, DB, scripts, c, duration, accounts)
                print_row(refs[label, c])
    # The HTTP ceiling on the service's own server, and on uvicorn's own (issue 26's figure).
    for label, command in (("hello", hello_command), ("hello uvicorn", uvicorn_hello_command)):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with serving(command(port), dict(os.environ), f"{url}/") as pid:
            wrk("warm-up", url, "-", "hello", 64, 2, pid)
            for c in CONNECTIONS:
                refs[label, c] = wrk(HELLO_NAMES[label], url, "-", "hello", c, duration, pid)
                print_row(refs[label, c])
    return refs


HELLO_NAMES = {
    "hello": "hello (HTTP ceiling)",
    "hello uvicorn": "hello, uvicorn's own protocol",
}
# hello_app under the service's server, as `ciris-billing serve --workers 2` runs (cli.py):
# serving.py's protocol, one SO_REUSEPORT socket per worker (workers.py), no access log.
_HELLO_SERVER = """
import sys, uvicorn
from ciris_billing.serving import TimedHttpToolsProtocol
from ciris_billing.workers import Supervisor, listening_sockets
port = int(sys.argv[1])
config = uvicorn.Config("hello_app:app", host="127.0.0.1", port=port, workers=2,
    http=TimedHttpToolsProtocol, access_log=False, log_config=None, server_header=False,
    timeout_keep_alive=15)
Supervisor(config, listening_sockets("127.0.0.1", port, 2)).run()
"""


def hello_command(port: int) -> list[str]:
    return [str(BIN / "python"), "-c", _HELLO_SERVER, str(port)]


def uvicorn_hello_command(port: int) -> list[str]:
    """hello_app under uvicorn's own httptools protocol and supervisor (the issue's figure)."""
    hello = [str(BIN / "python"), "-m", "uvicorn", "hello_app:app", "--app-dir", str(BENCH)]
    options = f"--host 127.0.0.1 --port {port} --workers 2 --loop uvloop --http httptools"
    return hello + f"{options} --no-access-log --no-server-header --log-level warning".split()


def service_command(port: int) -> list[str]:
    options = f"serve --host 127.0.0.1 --port {port} --workers 2 --no-migrate"
    return [str(BIN / "ciris-billing"), *options.split()]


# (name, wrk mode, accounts, reference); (f)'s references are (b) and (d) of the same run.
RESERVE_CAPTURE = "(f) reserve then capture"
CLIENT_MIX = "(d') agent mix as the client sends it"
SCENARIOS: tuple[tuple[str, str, int, str | None], ...] = (
    ("(a) check, random", "check", ACCOUNTS, "pgbench check"),
    ("(b) charge, random", "charge", ACCOUNTS, "pgbench charge"),
    ("(c) charge, hot account", "hot", ACCOUNTS, "pgbench charge hot"),
    ("(d) agent mix: check+charge", "mix", ACCOUNTS, "pgbench mix"),
    # The agent client's loop (issue 26): its check answered from the charge's next_check,
    # so one keyed charge is one interaction; its ratio column is interactions (see
    # client_ratio).
    (CLIENT_MIX, "client", ACCOUNTS, None),
    ("(e) charge, random, 1k accounts", "charge", OVERLAP_ACCOUNTS, "pgbench charge 1k"),
    (RESERVE_CAPTURE, "reserve", ACCOUNTS, None),
)


def interaction_ratios(row: Row, rows: list[Row]) -> str:
    """(f): one interaction is two requests (a hold, its capture), as (d)'s (a check, a charge);
    its interactions/s against (b)'s charges/s and (d)'s interactions/s at the same connections."""
    by = {(r.scenario, r.connections): r for r in rows}
    charges = by["(b) charge, random", row.connections].rps
    mix = by["(d) agent mix: check+charge", row.connections].rps / 2
    interactions = row.rps / 2
    return (
        f"{interactions:,.0f} interactions/s: {interactions / charges:.2f} x (b) charges, "
        f"{interactions / mix:.2f} x (d) interactions"
    )


def client_ratio(row: Row, rows: list[Row], refs: dict[tuple[str, int], Row]) -> str:
    """(d'): one request is one interaction (a charge whose answer answers the next check);
    its interactions/s against (d)'s (two requests each) and pgbench mix's (two statements)."""
    by = {(r.scenario, r.connections): r for r in rows}
    text = f"{row.rps:,.0f} interactions/s"
    mix = by.get(("(d) agent mix: check+charge", row.connections))
    if mix is not None:
        text += f": {row.rps / (mix.rps / 2):.2f} x (d) interactions"
    if ("pgbench mix", row.connections) in refs:
        text += f", {row.rps / (refs['pgbench mix', row.connections].rps / 2):.2f} x pgbench mix"
    return text


# `--holds`: only what issue 13's target compares, in one run ((f) against (d); (b) for its ratio).
HOLD_SCENARIOS = tuple(s for s in SCENARIOS if s[0][:3] in ("(b)", "(d)", "(f)"))
# --rated (issue 24): (b) and its rated twins, 300 units a charge at 1,000 units per use:
# `carry` (7 in 10 charges complete no use and only keep the remainder) and `up` (1 use each).
RATED_SCENARIOS: tuple[tuple[str, str, int, str | None], ...] = (
    SCENARIOS[1],
    ("(b-carry) rated charge, carry", "carry", ACCOUNTS, "pgbench charge"),
    ("(b-up) rated charge, up", "up", ACCOUNTS, "pgbench charge"),
)


def set_rates(db: str) -> None:
    """The rates the rated scenarios charge by (bench/billing.lua's features)."""
    for rounding in ("carry", "up"):
        command = [str(BIN / "ciris-billing"), "rates", "set", f"bench-{rounding}"]
        run([*command, "--units-per-use", "1000", "--rounding", rounding], env=service_env(db))


def rated_ratios(rows: list[Row]) -> list[str]:
    """Each rated scenario's charges/s against (b)'s at the same connections (target: >= 0.9)."""
    by = {(r.scenario[:3], r.connections): r for r in rows}
    lines = []
    for row in rows:
        base = by.get(("(b)", row.connections))
        if base is not None and row is not base:
            ratio = row.rps / base.rps
            mark = "x" if ratio >= 0.9 else " "
            lines.append(f"- [{mark}] {row.scenario}, c={row.connections}: {ratio:.2f} x (b)")
    return lines


def service(
    key: str,
    duration: int,
    refs: dict[tuple[str, int], Row],
    idempotency: bool,
    scenarios: Sequence[tuple[str, str, int, str | None]] = SCENARIOS,
) -> tuple[list[Row], str]:
    """The scenarios against `ciris-billing serve --workers 2`; rows and the hot check."""
    rows: list[Row] = []
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        tempfile.TemporaryDirectory() as metrics,
        serving(service_command(port), service_env(DB, metrics), f"{url}/health") as pid,
    ):
        wrk("warm-up", url, key, "check", 64, 2, pid)
        hot_before, hot_ok = total_uses(DB, 0), 0
        for name, mode, accounts, ref in scenarios:
            for c in CONNECTIONS:
                prefix = f"bench-{time.time_ns()}" if idempotency else ""
                row = wrk(
                    name, url, key, mode, c, duration, pid, accounts=accounts, idempotency=prefix
                )
                if name == CLIENT_MIX:
                    row.ratio = client_ratio(row, rows, refs)
                elif ref is None:
                    row.ratio = interaction_ratios(row, rows)
                elif (ref, c) in refs:
                    row.ratio = f"{row.rps / refs[ref, c].rps:.2f} x {ref}"
                if mode == "check":
                    row.ratio += f"; {row.rps / refs['hello', c].rps:.2f} x hello"
                if mode == "hot":
                    hot_ok += row.successes
                rows.append(row)
                print_row(row)
    hot_after = total_uses(DB, 0)
    in_flight = hot_after - hot_before - hot_ok
    verdict = "consistent" if 0 <= in_flight <= sum(CONNECTIONS) else "INCONSISTENT"
    hot = (
        f"Hot account bench-0@example.com: total_uses {hot_after} (+{hot_after - hot_before} "
        f"during scenario (c)); wrk saw {hot_ok} successful charges; the {in_flight} more were "
        f"in flight when wrk stopped (0..{sum(CONNECTIONS)} expected): {verdict}."
    )
    return rows, hot


# --redis-url: the hot scenarios again with the rate limits in Redis (shared across workers),
# against the same scenarios with per-process limits, both measured here, one after the other.
SHARED_LIMITS = (("(a) check, random", "check"), ("(b) charge, random", "charge"))


def shared_limits(key: str, duration: int, redis_url: str) -> list[Row]:
    """(a) and (b), each without and then with REDIS_URL, in turns (the machine's speed drifts
    between minutes: adjacent measurements compare best)."""
    rows: list[Row] = []
    for name, mode in SHARED_LIMITS:
        for c in CONNECTIONS:
            for label, redis in (("per process", None), ("REDIS_URL", redis_url)):
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                with (
                    tempfile.TemporaryDirectory() as metrics,
                    serving(
                        service_command(port), service_env(DB, metrics, redis), f"{url}/health"
                    ) as pid,
                ):
                    wrk("warm-up", url, key, mode, 64, 2, pid)
                    row = wrk(f"{name}, limits {label}", url, key, mode, c, duration, pid)
                if redis is not None:
                    row.ratio = f"{row.rps / rows[-1].rps:.2f} x per process"
                rows.append(row)
                print_row(row)
    return rows


def audit(db: str) -> str:
    command = [str(BIN / "ciris-billing"), "audit"]
    done = subprocess.run(  # noqa: S603 (our own venv's program)
        command, env=service_env(db), capture_output=True, text=True, check=False, timeout=1800
    )
    return f"$ ciris-billing audit  (exit {done.returncode})\n{done.stdout.strip()}"


def growth(duration: int, requests: int, base: Row, lots: bool = False) -> tuple[Row, str]:
    """Scenario (b) at 64 connections on 1M accounts / ~5M ledger rows, and worker memory."""
    started = time.monotonic()
    key = create_database(GROWTH_DB, GROWTH_ACCOUNTS, history=True, lots=lots)
    counts = (
        "SELECT (SELECT count(*) FROM accounts),"
        " (SELECT count(*) FROM charges) + (SELECT count(*) FROM credits)"
    )
    accounts, ledger = psql(counts, GROWTH_DB).split("|")
    seconds = time.monotonic() - started
    lines = [f"Seeded {int(accounts):,} accounts, {int(ledger):,} ledger rows in {seconds:.0f} s."]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        tempfile.TemporaryDirectory() as metrics,
        serving(service_command(port), service_env(GROWTH_DB, metrics), f"{url}/health") as pid,
    ):
        rss = [(0, worker_rss_mb(pid))]
        name = "(b) charge, random, 1M accounts"
        # Seeding just wrote ~1 GB: flush it (CHECKPOINT) and warm up, as the 10k figure was,
        # so the measurement is of charging 1M accounts, not of the seeding's aftermath.
        psql("CHECKPOINT", GROWTH_DB)
        warm = wrk("warm-up", url, key, "charge", 64, duration, pid, accounts=GROWTH_ACCOUNTS)
        lines.append(f"Warm-up after a CHECKPOINT: {warm.rps:,.0f}/s for {duration} s.")
        row = wrk(name, url, key, "charge", 64, duration, pid, accounts=GROWTH_ACCOUNTS)
        row.ratio = f"{row.rps / base.rps:.2f} x (b) at 10k accounts"
        served = warm.successes + row.successes
        for target in sorted({min(100_000, requests), requests}):
            if target > served:
                more = target - served
                part = wrk(
                    name, url, key, "charge", 64, 7200, pid, accounts=GROWTH_ACCOUNTS, limit=more
                )
                served += part.successes
                lines.append(
                    f"{part.successes:,} more charges at {part.rps:,.0f}/s "
                    f"(p99 {part.p99:.1f} ms, {part.errors} errors)."
                )
            rss.append((served, worker_rss_mb(pid)))
            now = ", ".join(f"{mb:.1f}" for mb in rss[-1][1].values())
            print(f"  worker RSS after {served:,} charges: {now} MB", flush=True)
    for count, sizes in rss:
        mb = ", ".join(f"{v:.1f}" for v in sizes.values())
        lines.append(f"Worker RSS after {count:,} charges: {mb} MB")
    largest = max(max(sizes.values(), default=0.0) for _, sizes in rss)
    (first, at_first), (last, at_last) = rss[-2], rss[-1]
    change = max((at_last[p] / at_first[p] - 1 for p in at_last if p in at_first), default=0.0)
    audited = audit(GROWTH_DB)
    checks = [
        (
            f"throughput within 15% of 10k accounts: {row.rps / base.rps:.2f}",
            row.rps >= 0.85 * base.rps,
        ),
        (f"RSS under 150 MB per worker: largest {largest:.1f} MB", largest < 150),
        (f"RSS growth from {first:,} to {last:,} charges under 10%: {change:+.1%}", change < 0.1),
        ("audit clean", "exit 0" in audited),
    ]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    return row, "\n".join([*lines, audited])


# ------------------------------------------------------------------------------- reporting

HEADER = (
    "| scenario | conns | req/s | p50 ms | p90 ms | p99 ms | errors | server CPU | db CPU | ratio |"
)


def cells(row: Row) -> tuple[str, ...]:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}%"

    latencies = (f"{ms:.1f}" for ms in (row.p50, row.p90, row.p99))
    return (
        row.scenario,
        str(row.connections),
        f"{row.rps:,.0f}",
        *latencies,
        str(row.errors),
        pct(row.server_cpu),
        pct(row.db_cpu),
        row.ratio,
    )


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|---" * (HEADER.count("|") - 1) + "|"]
    lines += [f"| {' | '.join(cells(r))} |" for r in rows]
    return "\n".join(lines)


def print_row(row: Row) -> None:
    c = cells(row)
    line = f"  {c[0]:<32} c={c[1]:>2} {c[2]:>7} req/s  p99 {c[5]:>6} ms  errors {c[6]}"
    print(line, flush=True)


def hold_targets(rows: list[Row]) -> list[tuple[str, bool]]:
    """Issue 13's targets: (f) against (d) of the same run, at 8 and 64 connections."""
    by = {(r.scenario, r.connections): r for r in rows}
    checks = []
    for c in CONNECTIONS:
        holds, mix = by[RESERVE_CAPTURE, c], by["(d) agent mix: check+charge", c]
        vs_mix = holds.rps / mix.rps  # both: 2 requests per interaction
        checks.append(
            (
                f"(issue 13) reserve+capture c={c} >= 0.5 x the agent mix (interactions/s): "
                f"{holds.rps / 2:,.0f} / {mix.rps / 2:,.0f} = {vs_mix:.2f}",
                vs_mix >= 0.5,
            )
        )
    holds64 = by[RESERVE_CAPTURE, 64]
    holds_errors = sum(by[RESERVE_CAPTURE, c].errors for c in CONNECTIONS)
    checks += [
        (f"(issue 13) reserve+capture c=64 p99 < 100 ms: {holds64.p99:.1f} ms", holds64.p99 < 100),
        (f"(issue 13) reserve+capture: {holds_errors} errors", holds_errors == 0),
    ]
    return checks


def targets(rows: list[Row], refs: dict[tuple[str, int], Row], clean: bool) -> list[str]:
    """The issue's targets, as checked by this run."""
    by = {(r.scenario, r.connections): r for r in rows}
    charge64, charge8 = by["(b) charge, random", 64], by["(b) charge, random", 8]
    check64 = by["(a) check, random", 64]
    hot_errors = sum(by["(c) charge, hot account", c].errors for c in CONNECTIONS)
    overlap_errors = sum(by["(e) charge, random, 1k accounts", c].errors for c in CONNECTIONS)
    vs_pgbench = charge64.rps / refs["pgbench charge", 64].rps
    vs_hello = check64.rps / refs["hello", 64].rps
    audit_text = "clean" if clean else "NOT clean"
    checks = [
        (f"charges c=64 >= 0.5 x pgbench charge: {vs_pgbench:.2f}", vs_pgbench >= 0.5),
        (f"charges c=64 p99 < 100 ms: {charge64.p99:.1f} ms", charge64.p99 < 100),
        (f"charges c=8 p99 < 20 ms: {charge8.p99:.1f} ms", charge8.p99 < 20),
        (f"checks c=64 >= 0.5 x hello: {vs_hello:.2f}", vs_hello >= 0.5),
        (f"hot account: {hot_errors} errors, audit {audit_text}", hot_errors == 0 and clean),
        (
            f"charges over 1k accounts (overlapping batches): {overlap_errors} errors",
            overlap_errors == 0,
        ),
        *hold_targets(rows),
    ]
    return [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]


# Issue 26: (figure, target) as the issue's table has them.
ISSUE_26 = (
    ("charges c=8 / pgbench charge", ">= 0.6"),
    ("charges c=64 / pgbench charge", ">= 1.2"),
    ("agent mix c=8 / pgbench mix", ">= 0.5"),
    ("agent mix c=64 / pgbench mix", ">= 0.8"),
    ("agent mix as the client sends it c=8 / pgbench mix (interactions)", ">= 0.5"),
    ("agent mix as the client sends it c=64 / pgbench mix (interactions)", ">= 0.8"),
    ("checks c=64 / hello on the same server", ">= 0.85"),
    ("hello c=64 / hello under uvicorn's own protocol", ">= 1.3"),
    ("charges c=8 p99", "< 5 ms"),
    ("checks c=8 p99", "< 2 ms"),
    ("charges c=64 p99", "< 20 ms"),
    ("checks c=64 p99", "< 20 ms"),
)


def issue26_targets(rows: list[Row], refs: dict[tuple[str, int], Row]) -> str:
    """Issue 26's table: each figure of this run against its target, marked met or not."""
    by = {(r.scenario, r.connections): r for r in rows}
    charge = {c: by["(b) charge, random", c] for c in CONNECTIONS}
    check = {c: by["(a) check, random", c] for c in CONNECTIONS}
    mix = {c: by["(d) agent mix: check+charge", c] for c in CONNECTIONS}
    client = {c: by[CLIENT_MIX, c] for c in CONNECTIONS}
    ratios = [
        charge[8].rps / refs["pgbench charge", 8].rps,
        charge[64].rps / refs["pgbench charge", 64].rps,
        mix[8].rps / refs["pgbench mix", 8].rps,
        mix[64].rps / refs["pgbench mix", 64].rps,
        # One request per interaction, against pgbench's two statements per interaction.
        client[8].rps / (refs["pgbench mix", 8].rps / 2),
        client[64].rps / (refs["pgbench mix", 64].rps / 2),
        check[64].rps / refs["hello", 64].rps,
        refs["hello", 64].rps / refs["hello uvicorn", 64].rps,
    ]
    floors = (0.6, 1.2, 0.5, 0.8, 0.5, 0.8, 0.85, 1.3)
    latencies = (charge[8].p99, check[8].p99, charge[64].p99, check[64].p99)
    ceilings = (5.0, 2.0, 20.0, 20.0)
    figures = [f"{r:.2f}" for r in ratios] + [f"{ms:.1f} ms" for ms in latencies]
    met = [r >= f for r, f in zip(ratios, floors, strict=True)]
    met += [ms < c for ms, c in zip(latencies, ceilings, strict=True)]
    lines = ["| | figure | this run | target |", "|---|---|---|---|"]
    for (figure, target), value, ok in zip(ISSUE_26, figures, met, strict=True):
        lines.append(f"| [{'x' if ok else ' '}] | {figure} | {value} | {target} |")
    hello = refs["hello", 64].rps
    lines.append(
        f"\n(hello c=64: {hello:,.0f} req/s on the service's server, "
        f"{refs['hello uvicorn', 64].rps:,.0f} under uvicorn's own protocol; other servers: "
        "bench/servers.py)"
    )
    return "\n".join(lines)


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    mem = re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
    pg = psql("SELECT version()").split(" on ")[0]
    sync = psql("SHOW synchronous_commit").strip()
    wrk_version = run([WRK, "-v"], check=False).splitlines()[0].split(" [")[0]  # exits 1
    return (
        f"{os.cpu_count()} cores ({model.group(1) if model else 'unknown CPU'}), "
        f"{int(mem.group(1)) // 1024 // 1024 if mem else '?'} GiB; {pg} "
        f"(synchronous_commit {sync}); Python {platform.python_version()}; "
        f"{wrk_version} and pgbench on the same cores"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="3 s per measurement")
    parser.add_argument(
        "--growth", action="store_true", help="also 1M accounts / 5M ledger rows, worker RSS (long)"
    )
    parser.add_argument(
        "--idempotency",
        action="store_true",
        help="every charge, hold and capture sends a unique Idempotency-Key",
    )
    parser.add_argument(
        "--holds",
        action="store_true",
        help="only scenarios (b), (d) and (f) (issue 13's target), no references; prints the "
        "table and the audit, RESULTS.md untouched",
    )
    parser.add_argument(
        "--rated",
        action="store_true",
        help="only scenario (b) and its rated twins (issue 24: feature and quantity, carry and "
        "up rounding), no references; prints the table and the audit, RESULTS.md untouched",
    )
    parser.add_argument(
        "--lots",
        action="store_true",
        help="every account also has an expiring promotional lot, consumed first (issue 23)",
    )
    parser.add_argument(
        "--growth-requests", type=int, default=1_000_000, help="charges before the last RSS reading"
    )
    parser.add_argument(
        "--redis-url",
        help="also run (a) and (b) with this REDIS_URL (rate limits shared) and without, in turns",
    )
    args = parser.parse_args()
    duration = 3 if args.quick else args.duration
    command = " ".join([".venv/bin/python bench/run.py", *sys.argv[1:]])
    started, date = time.monotonic(), datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = f"load average {os.getloadavg()[0]:.2f} at the start"  # others' work shares the cores
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-ups below
    ensure_wrk()
    try:
        print(f"Seeding {ACCOUNTS:,} accounts in {DB} ...", flush=True)
        key = create_database(DB, ACCOUNTS, history=False, lots=args.lots)
        if args.rated:
            set_rates(DB)
            print("The service (ciris-billing serve --workers 2), scenario (b) and rated twins:")
            rows, _ = service(key, duration, {}, args.idempotency, RATED_SCENARIOS)
            for row, line in zip(rows[len(CONNECTIONS) :], rated_ratios(rows), strict=True):
                row.ratio = line.split(": ")[-1]
            print(f"\n{table(rows)}\n\n{audit(DB)}\n\nTarget (issue 24: within 10% of (b)):")
            print("\n".join(rated_ratios(rows)))
            return
        if args.holds:
            print("The service (ciris-billing serve --workers 2), scenarios (b), (d), (f):")
            rows, _ = service(key, duration, {}, args.idempotency, HOLD_SCENARIOS)
            print(f"\n{table(rows)}\n\n{audit(DB)}\n\nTargets (issue 13):")
            print("\n".join(f"- [{'x' if ok else ' '}] {text}" for text, ok in hold_targets(rows)))
            return
        print(f"References ({duration} s each):", flush=True)
        refs = references(duration)
        print("The service (ciris-billing serve --workers 2):", flush=True)
        rows, hot = service(key, duration, refs, args.idempotency)
        if args.redis_url:
            print("Rate limits per process, then in Redis (REDIS_URL):", flush=True)
            rows += shared_limits(key, duration, args.redis_url)
        audited = audit(DB)
        if args.growth:
            print("Growth (1M accounts; long) ...", flush=True)
            base = next(r for r in rows if r.scenario.startswith("(b)") and r.connections == 64)
            growth_row, growth_text = growth(duration, args.growth_requests, base, args.lots)
    finally:
        drop_database(DB)
        if args.growth:
            drop_database(GROWTH_DB)
    elapsed = time.monotonic() - started
    load += f", {os.getloadavg()[0]:.2f} at the end"
    header = (
        f"- Command: `{command}` (`make bench` runs it without flags), "
        f"{duration} s per measurement, total {elapsed:.0f} s\n"
        f"- Date: {date}\n- Machine: {machine()}; {load}\n"
        f"- Server: `ciris-billing serve --workers 2` (uvicorn, uvloop, httptools: serving.py's "
        "protocol), "
        f"{' '.join(f'{k}={v}' for k, v in SERVICE_SETTINGS.items())}; "
        f"wrk -t2 over loopback; CPU in % of one core (200% = both); "
        f"charges, holds and captures {'with' if args.idempotency else 'without'} an "
        "Idempotency-Key"
    )
    growth_file = BENCH / "RESULTS-growth.md"
    if args.growth:
        growth_part = f"Growth:\n\n{table([growth_row, base])}\n\n{growth_text}"
        growth_file.write_text(f"# Growth benchmark\n\n{header}\n\n{growth_part}\n")
    elif growth_file.exists():
        growth_part = "Growth: not measured in this run (`--growth`); the last growth run is in "
        growth_part += "RESULTS-growth.md."
    else:
        growth_part = "Growth: not measured in this run (`--growth`)."
    all_rows = rows + sorted(refs.values(), key=lambda r: (r.scenario, r.connections))
    checks = targets(rows, refs, "exit 0" in audited)
    report = f"{table(all_rows)}\n\n{audited}\n\n{hot}\n\nTargets (issues 5 and 13):\n"
    report += "\n".join(checks)
    report += f"\n\nTargets (issue 26):\n\n{issue26_targets(rows, refs)}\n\n{growth_part}"
    print(f"\n{report}\n\nTotal time: {elapsed:.0f} s; {load}")
    (BENCH / "RESULTS.md").write_text(f"# Benchmark results\n\n{header}\n\n{report}\n")


if __name__ == "__main__":
    main()
