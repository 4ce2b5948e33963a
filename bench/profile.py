"""Where a worker's CPU goes on the hot path: py-spy on one worker under load (issue 26 item 1).

    .venv/bin/python bench/profile.py [--seconds 10] [--rate 250] [--native] [--out DIR]

Seeds a fresh bench database (10,000 accounts, as bench/run.py), serves it with
`ciris-billing serve --workers 2` (bench/run.py's settings), and for each scenario — (b) charges
on random accounts and (d) the agent's mix (a check then a charge), both at 8 connections —
drives it with wrk while `py-spy record --format raw` samples ONE worker (the other worker
shares the load through SO_REUSEPORT). Prints each scenario's top frames by self time and by
cumulative time (% of the worker's busy samples: an idle event loop is not sampled) and keeps
the raw collapsed stacks in DIR (default: a temporary directory, printed). The database is
dropped at the end.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import run as bench

PY_SPY = bench.BIN / "py-spy"
SCENARIOS = (("(b) charge, random", "charge"), ("(d) agent mix: check+charge", "mix"))
# py-spy's frame text: "function (file:line)"; with --nolineno "function (file)".
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")


def frame_name(frame: str) -> str:
    match = _FRAME.match(frame)
    return f"{match['func']} ({match['file']})" if match else frame


# Cumulative frames on (nearly) every sample are the process's scaffolding (the runner, the
# event loop's own frames): left out of the cumulative table.
SCAFFOLD = 0.85


def top_frames(
    raw: Path, count: int
) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """Samples; the `count` frames with the most self and the most cumulative samples; and the
    write() system calls by the Python frame that made them (with --native)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    writes: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        n = int(number)
        frames = [frame_name(f) for f in stack.split(";")]
        samples += n
        own[frames[-1]] += n
        for name in set(frames):  # a recursive frame counts once per sample
            total[name] += n
        if frames[-1].startswith("write (libc"):
            python = [f for f in frames if ".py)" in f]
            writes[" < ".join(reversed(python[-2:])) or "?"] += n
    cumulative = [(f, n) for f, n in total.most_common() if n < SCAFFOLD * samples][:count]
    return samples, own.most_common(count), cumulative, writes.most_common(5)


def report(name: str, raw: Path, count: int) -> str:
    samples, own, total, writes = top_frames(raw, count)
    lines = [f"### {name}: {samples:,} busy samples of one worker", ""]
    tables = [("self", own), ("cumulative", total)]
    tables += [("write() calls, by caller", writes)] if writes else []
    for title, rows in tables:
        lines += [f"| {title} % | frame |", "|---|---|"]
        lines += [f"| {n / samples * 100:.1f} | `{frame}` |" for frame, n in rows]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10, help="py-spy's sampling per scenario")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument(
        "--gil", action="store_true", help="py-spy --gil (only the thread holding it)"
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="where the raw stacks go (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ciris-billing-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    bench.ensure_wrk()
    sections = []
    try:
        print(f"Seeding {bench.ACCOUNTS:,} accounts in {bench.DB} ...", flush=True)
        key = bench.create_database(bench.DB, bench.ACCOUNTS, history=False)
        port = bench.free_port()
        url = f"http://127.0.0.1:{port}"
        with (
            tempfile.TemporaryDirectory() as metrics,
            bench.serving(
                bench.service_command(port), bench.service_env(bench.DB, metrics), f"{url}/health"
            ) as pid,
        ):
            workers = sorted(bench.worker_rss_mb(pid))
            worker = workers[0]
            print(f"server {pid}, workers {workers}; profiling {worker}", flush=True)
            bench.wrk("warm-up", url, key, "mix", 64, 3, pid)
            for name, mode in SCENARIOS:
                raw = out / f"{mode}-c{args.connections}.txt"
                spy = [str(PY_SPY), "record", "--pid", str(worker), "--format", "raw"]
                spy += ["--rate", str(args.rate), "--duration", str(args.seconds), "--nolineno"]
                spy += ["--output", str(raw), *(["--native"] if args.native else [])]
                spy += ["--gil"] if args.gil else []
                # wrk runs 2 s longer than py-spy samples: the sampling sees only steady load.
                seconds = args.seconds + 3
                with ThreadPoolExecutor(1) as pool:
                    load = pool.submit(
                        bench.wrk, name, url, key, mode, args.connections, seconds, pid
                    )
                    subprocess.run(  # noqa: S603 (py-spy from our venv, our own arguments)
                        spy, check=True, capture_output=True, timeout=args.seconds + 60
                    )
                    row = load.result()
                bench.print_row(row)
                figures = (
                    f"{row.rps:,.0f} req/s, p99 {row.p99:.1f} ms, server CPU "
                    f"{row.server_cpu:.0f}%, db CPU {row.db_cpu:.0f}% (while profiled)"
                )
                sections.append(report(f"{name}, c={args.connections}; {figures}", raw, args.top))
    finally:
        bench.drop_database(bench.DB)
    command = " ".join([".venv/bin/python bench/profile.py", *sys.argv[1:]])
    print(f"\n$ {command}\nraw stacks in {out}\n")
    print("\n".join(sections))


if __name__ == "__main__":
    main()
