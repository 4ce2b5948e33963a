"""The HTTP server, compared in one run (issue 26 item 2): hello and the hot path under each.

    .venv/bin/python bench/servers.py [--duration S | --quick] [--servers uvicorn,granian]

One fresh bench database (bench/run.py's seeding, 10,000 accounts), then for each server, with
the same workers (2), the same app and the same event loop (uvloop):

- `hello`: bench/hello_app.py, the bare FastAPI JSON endpoint (the HTTP ceiling);
- (a) credit checks and (b) charges on random accounts, against the service (`create_app`).

Servers: `uvicorn` is what `ciris-billing serve --workers 2` runs (uvicorn with httptools and
serving.py's protocol: read timeouts, headers and body in one write; workers on SO_REUSEPORT
sockets), hello under the same (run.py's hello_command). `uvicorn-plain` is uvicorn's own
httptools protocol and supervisor (`uvicorn --workers 2 --http httptools`: the issue's figure).
`granian` is granian's ASGI interface (HTTP/1 only, no websockets, its own workers).
`raw-asgi` (hello only) is bench/raw_asgi_hello.py, the same answer from a bare ASGI callable
under the service's server: what the server costs without FastAPI. `raw-protocol` (hello only)
is bench/raw_hello.py: the same answer from a bare uvloop + httptools
protocol, no ASGI and no framework: the floor under any ASGI server's cost per request. Every
measurement is wrk -t2 for the duration, after a 2 s warm-up per server; the table gives req/s,
latency, and each figure against uvicorn's. Nothing is written; the database is dropped.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable

import run as bench

APP = "ciris_billing.app:create_app"


def granian(target: str, port: int, factory: bool) -> list[str]:
    options = f"--interface asgi --http 1 --no-ws --workers 2 --loop uvloop --port {port}"
    options += " --host 127.0.0.1 --log-level warning --no-access-log"
    options += " --factory" if factory else f" --working-dir {bench.BENCH}"
    return [str(bench.BIN / "granian"), *options.split(), target]


def uvicorn_plain(target: str, port: int, factory: bool) -> list[str]:
    options = f"--host 127.0.0.1 --port {port} --workers 2 --loop uvloop --http httptools"
    options += " --no-access-log --no-server-header --log-level warning"
    options += " --factory" if factory else f" --app-dir {bench.BENCH}"
    return [str(bench.BIN / "python"), "-m", "uvicorn", *options.split(), target]


def raw_asgi(port: int) -> list[str]:
    """raw_asgi_hello.py's bare ASGI hello under the service's server (run.py's hello_command)."""
    return [arg.replace("hello_app:app", "raw_asgi_hello:app") for arg in bench.hello_command(port)]


def raw_protocol(port: int) -> list[str]:
    return [str(bench.BIN / "python"), str(bench.BENCH / "raw_hello.py"), str(port)]


# server -> (hello command, service command or None: hello only), each given the port.
SERVERS: dict[str, tuple[Callable[[int], list[str]], Callable[[int], list[str]] | None]] = {
    "uvicorn": (bench.hello_command, bench.service_command),
    "uvicorn-plain": (
        bench.uvicorn_hello_command,
        lambda port: uvicorn_plain(APP, port, factory=True),
    ),
    "granian": (
        lambda port: granian("hello_app:app", port, factory=False),
        lambda port: granian(APP, port, factory=True),
    ),
    "raw-asgi": (raw_asgi, None),
    "raw-protocol": (raw_protocol, None),
}
SCENARIOS = (("(a) check, random", "check"), ("(b) charge, random", "charge"))


def measure(server: str, key: str, duration: int) -> list[bench.Row]:
    hello_command, service_command = SERVERS[server]
    rows = []
    port = bench.free_port()
    url = f"http://127.0.0.1:{port}"
    with bench.serving(hello_command(port), dict(os.environ), f"{url}/") as pid:
        bench.wrk("warm-up", url, "-", "hello", 64, 2, pid)
        for c in bench.CONNECTIONS:
            rows.append(bench.wrk(f"{server}: hello", url, "-", "hello", c, duration, pid))
            bench.print_row(rows[-1])
    if service_command is None:
        return rows
    port = bench.free_port()
    url = f"http://127.0.0.1:{port}"
    with (
        tempfile.TemporaryDirectory() as metrics,
        bench.serving(
            service_command(port), bench.service_env(bench.DB, metrics), f"{url}/health"
        ) as pid,
    ):
        bench.wrk("warm-up", url, key, "check", 64, 2, pid)
        for name, mode in SCENARIOS:
            for c in bench.CONNECTIONS:
                rows.append(bench.wrk(f"{server}: {name}", url, key, mode, c, duration, pid))
                bench.print_row(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    parser.add_argument("--quick", action="store_true", help="3 s per measurement")
    parser.add_argument("--servers", default="uvicorn,uvicorn-plain,granian,raw-asgi,raw-protocol")
    args = parser.parse_args()
    duration = 3 if args.quick else args.duration
    servers = args.servers.split(",")
    bench.ensure_wrk()
    rows: list[bench.Row] = []
    try:
        print(f"Seeding {bench.ACCOUNTS:,} accounts in {bench.DB} ...", flush=True)
        key = bench.create_database(bench.DB, bench.ACCOUNTS, history=False)
        for server in servers:
            print(f"{server}:", flush=True)
            rows += measure(server, key, duration)
    finally:
        bench.drop_database(bench.DB)
    base = {
        (r.scenario.split(": ", 1)[1], r.connections): r
        for r in rows
        if r.scenario.startswith(f"{servers[0]}: ")
    }
    for row in rows:
        ref = base[row.scenario.split(": ", 1)[1], row.connections]
        row.ratio = f"{row.rps / ref.rps:.2f} x {servers[0]}"
        if not row.scenario.endswith("hello"):
            hello = next(
                r
                for r in rows
                if r.scenario == row.scenario.split(": ")[0] + ": hello"
                and r.connections == row.connections
            )
            row.ratio += f"; {row.rps / hello.rps:.2f} x its hello"
    command = " ".join([".venv/bin/python bench/servers.py", *sys.argv[1:]])
    print(f"\n$ {command}  ({duration} s per measurement)\n\n{bench.table(rows)}")


if __name__ == "__main__":
    main()
