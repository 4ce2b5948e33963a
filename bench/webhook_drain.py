"""How long a backlog of outgoing webhooks takes to drain to one slow receiver (issue 22 item 3).

    .venv/bin/python bench/webhook_drain.py [--backlog 523] [--delay 0.25] [--concurrency 1 10]

A fresh database on PG_SERVER (dropped at the end), the service in process (no HTTP in front),
a receiver on 127.0.0.1 answering 200 after `--delay` seconds, a backlog of outgoing events
(accounts charged through the API: account.created, balance.low, balance.depleted), then the
delivery jobs' own code (events/delivery.py) drains it, once per WEBHOOK_ENDPOINT_CONCURRENCY
given. Prints one line per run: deliveries, drain time, deliveries per second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import asyncpg
import httpx

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing.cli import migrate_database
from ciris_billing.config import Settings
from ciris_billing.events.delivery import Deliveries

PG_SERVER = os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432")


@contextlib.contextmanager
def slow_receiver(delay: float) -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            time.sleep(delay)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks"
    finally:
        server.shutdown()
        server.server_close()


async def drain_once(database: str, url: str, backlog: int, concurrency: int) -> str:
    settings = Settings(
        _env_file=None,
        database_url=database,
        jobs_enabled=False,
        allow_private_webhook_urls=True,
        rate_limit_account_per_minute=1_000_000,
        webhook_endpoint_concurrency=concurrency,
        log_level="WARNING",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        engine = app.state.billing.engine
        async with engine.begin() as conn:
            _id, key = await auth.create_key(conn, "bench", frozenset({"admin"}))
        transport = httpx.ASGITransport(app=app)
        headers = {"X-API-Key": key}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", headers=headers
        ) as http:
            made = await http.post("/v1/billing/webhook_endpoints", json={"url": url})
            made.raise_for_status()
            made_events, index = 0, 0
            while made_events < backlog:
                who = {"oauth_provider": "oauth:bench", "external_id": f"c{concurrency}-{index}"}
                for _ in range(3):
                    (await http.post("/v1/billing/charges", json=who)).raise_for_status()
                made_events, index = made_events + 3, index + 1
        deliveries = Deliveries(engine, settings)
        try:
            queued = await deliveries.dispatch()
            started = time.monotonic()
            delivered = 0
            while delivered < queued:
                report = await deliveries.run_once()
                if not report.runs:
                    break
                delivered += report.delivered
            elapsed = time.monotonic() - started
        finally:
            await deliveries.aclose()
        # Leave nothing for the next run.
        async with engine.begin() as conn:
            await conn.exec_driver_sql("DELETE FROM webhook_endpoints")
    return (
        f"WEBHOOK_ENDPOINT_CONCURRENCY={concurrency:<3} {delivered} of {queued} deliveries "
        f"drained in {elapsed:6.1f} s: {delivered / elapsed:5.1f}/s"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=523)
    parser.add_argument("--delay", type=float, default=0.25, help="the receiver's answer time")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10])
    args = parser.parse_args()
    name = f"ciris_billing_bench_webhooks_{os.getpid()}"
    admin = await asyncpg.connect(f"{PG_SERVER}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    database = f"{PG_SERVER}/{name}"
    try:
        await asyncio.to_thread(migrate_database, database)
        print(f"backlog of ~{args.backlog} events, receiver answering in {args.delay:.2f} s:")
        with slow_receiver(args.delay) as url:
            for concurrency in args.concurrency:
                print(await drain_once(database, url, args.backlog, concurrency), flush=True)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
