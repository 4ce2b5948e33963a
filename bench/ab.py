"""Charges/s of two versions of the service at the same moment: `.venv/bin/python bench/ab.py
[--before REF] [--rounds N] [--seconds S] [--modes charge,check,mix] [--no-endpoint]`.

On a machine whose load moves a lot between runs (shared cores), two runs one after the other
compare the machine's moods more than the code. Here both versions serve at once, on one
seeded database, each with `serve --workers 2`, and wrk drives both at the same time (charges
on random accounts, 8 then 32 connections per server, N rounds): whatever slows the machine
slows both. A = REF (default `main`, unpacked with `git archive`, run with this venv); B = this
checkout with one webhook endpoint subscribed to every event (a receiver on 127.0.0.1 that
answers 204; with --no-endpoint, none: both versions then run the same configuration).
`--modes` (wrk modes of billing.lua, default `charge`): each round measures each mode in turn.
Prints each round and B/A. The database is dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import run as bench

CONNECTIONS = (8, 32)


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: object) -> None:
        return


def unpack(ref: str, into: Path) -> Path:
    """REF's tree in `into`; its source folder."""
    archive = subprocess.run(  # noqa: S603 (git with our own arguments)
        ["/usr/bin/git", "-C", str(bench.ROOT), "archive", ref],
        capture_output=True,
        check=True,
    )
    subprocess.run(  # noqa: S603
        ["/usr/bin/tar", "-x", "-C", str(into)], input=archive.stdout, check=True
    )
    return into / "src"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", default="main", help="the git ref to compare with")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=6, help="per measurement")
    parser.add_argument("--modes", default="charge", help="billing.lua modes, comma-separated")
    parser.add_argument(
        "--no-endpoint", action="store_true", help="no webhook endpoint (A and B alike)"
    )
    args = parser.parse_args()
    modes = args.modes.split(",")
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{receiver.server_address[1]}/hooks"
    db = f"ciris_billing_ab_{os.getpid()}"
    bench.ensure_wrk()
    results: dict[tuple[str, str, int], list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        sources = {
            f"A {args.before}": unpack(args.before, Path(folder)),
            f"B this checkout{'' if args.no_endpoint else ' + endpoint'}": bench.ROOT / "src",
        }
        try:
            key = bench.create_database(db, bench.ACCOUNTS, history=False)
            # Our own receiver's URL, no input:
            endpoint = (
                "INSERT INTO webhook_endpoints (id, url, secret, status, created_at, updated_at) "  # noqa: S608
                f"VALUES ('we_bench', '{hook}', 'whsec_' || encode(sha256('bench'), 'base64'), "
                "'enabled', now(), now())"
            )
            if not args.no_endpoint:
                bench.psql(endpoint, db)
            with ExitStack() as stack:
                servers = {}
                for name, src in sources.items():
                    env = dict(
                        bench.service_env(db),
                        PYTHONPATH=str(src),
                        ALLOW_PRIVATE_WEBHOOK_URLS="true",
                    )
                    port = bench.free_port()
                    url = f"http://127.0.0.1:{port}"
                    command = bench.service_command(port)
                    pid = stack.enter_context(bench.serving(command, env, f"{url}/health"))
                    servers[name] = (url, pid)
                    bench.wrk("warm-up", url, key, "check", 16, 2, pid)
                with ThreadPoolExecutor(len(servers)) as pool:
                    for round_ in range(args.rounds):
                        for mode in modes:
                            for c in CONNECTIONS:
                                runs = {
                                    name: pool.submit(
                                        bench.wrk, name, url, key, mode, c, args.seconds, pid
                                    )
                                    for name, (url, pid) in servers.items()
                                }
                                line = []
                                for name, future in runs.items():
                                    row = future.result()
                                    results.setdefault((name, mode, c), []).append(row.rps)
                                    line.append(
                                        f"{name}: {row.rps:,.0f} req/s, p99 {row.p99:.1f} ms "
                                        f"(errors {row.errors})"
                                    )
                                print(
                                    f"round {round_} {mode} c={c}: " + "; ".join(line), flush=True
                                )
            print(bench.audit(db))
        finally:
            bench.drop_database(db)
    a_name, b_name = sources
    for mode in modes:
        for c in CONNECTIONS:
            a, b = results[a_name, mode, c], results[b_name, mode, c]
            ratios = [y / x for x, y in zip(a, b, strict=True)]
            print(
                f"{mode} c={c}: A {[round(x) for x in a]}, B {[round(x) for x in b]}; B/A per "
                f"round {[round(r, 2) for r in ratios]}, median {statistics.median(ratios):.2f}, "
                f"totals {sum(b) / sum(a):.2f}"
            )


if __name__ == "__main__":
    sys.exit(main())
