"""The hot path's statement pool: asyncpg connections of its own, fair and reset-free."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.database_errors import connection_unusable, opened_read_only
from ciris_billing.db import POOL_TIMEOUT_SECONDS
from ciris_billing.observability import STATEMENT_RETRIES, log

# How many times one statement is sent when PostgreSQL rolls it back on a deadlock (40P01) or a
# serialization failure (40001): a handful, then the error is the request's.
STATEMENT_ATTEMPTS = 5
_TRANSIENT = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# The retry metric's label for a read sent again after its connection was lost.
_LOST = "connection_lost"
# Every statement of this pool reaches its rows through a unique index (an account by id or
# identity, a reservation by id, a key by its key), so a table scan is never the right plan;
# yet the planner picks one while a table is small, and a connection keeps a prepared
# statement's plan while the table grows (a capture on a new installation read every
# reservation ever made: tests/accounts/test_hot_plans.py). Scans are priced out, not forbidden.
HOT_PATH_SETTINGS = {"enable_seqscan": "off"}
# A connection idle this long is closed rather than used again (a proxy or the server may have
# dropped it meanwhile): asyncpg's pool's own limit, kept.
IDLE_SECONDS = 300.0
T = TypeVar("T")


class DuplicateKey(Exception):
    """A statement broke a unique constraint (the driver's error, kept inside this module)."""


class StatementPool:
    """The hot path's statements (credit checks and charges, one or a batch
    at a time) on asyncpg connections of its own beside the engine's pool, with the engine's
    connection parameters and timeouts. Taking a connection costs no SQLAlchemy checkout and no
    greenlet, and no asyncpg pool either: its acquire and release (a holder, a connection proxy
    whose every method is wrapped, a task to shield each release) cost as much CPU as the
    statement itself (measured: 48-65 us against 25-28 us for `SELECT $1`), and the turns below
    already bound and order the connections. Idle connections wait on a stack (the most recently
    used first: its prepared statements are warm).

    Requests get connections strictly in arrival order: a fair semaphore with one permit per
    connection admits them first come, first served. (asyncpg's pool, used before, handed a
    released connection to whichever request asked first, and a request already waiting went
    to the back of the line when a newcomer beat it; under load some requests starved for
    hundreds of milliseconds: p99.)
    """

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], size: int) -> None:
        self._connect = connect
        self._turns = asyncio.Semaphore(size)
        # (connection, its generation, idle since): at most `size`, one per turn not taken.
        self._idle: list[tuple[asyncpg.Connection, int, float]] = []
        # _expire() starts a new generation: connections of an older one are never used again.
        self._generation = 0
        self._closed = False

    @classmethod
    async def open(
        cls,
        engine: AsyncEngine,
        size: int,
        server_settings: dict[str, str] | None = None,
        connect_timeout: float = 5.0,
    ) -> StatementPool:
        """The pool for `engine`'s database (same parameters, no connection opened yet), its
        connections opened with `server_settings` (db.session_settings) and HOT_PATH_SETTINGS."""
        _args, parameters = engine.dialect.create_connect_args(engine.url)
        settings = {**HOT_PATH_SETTINGS, **(server_settings or {})}

        async def connect() -> asyncpg.Connection:
            # On demand (the service starts while the database is away), within the timeout.
            connection: asyncpg.Connection = await asyncpg.connect(
                **parameters, server_settings=settings, timeout=connect_timeout, command_timeout=30
            )
            return connection

        return cls(connect, size)

    async def fetch_one(
        self, sql: str, args: Sequence[Any], *, read: bool = False
    ) -> asyncpg.Record | None:
        """One statement on a pooled connection: its row, or None; DuplicateKey when it broke
        a unique constraint. `read`: it changes nothing (see _run)."""
        row: asyncpg.Record | None = await self._run("fetchrow", sql, args, read)
        return row

    async def fetch_all(
        self, sql: str, args: Sequence[Any], *, read: bool = False
    ) -> list[asyncpg.Record]:
        """One statement on a pooled connection: its rows; DuplicateKey and `read` as above."""
        rows: list[asyncpg.Record] = await self._run("fetch", sql, args, read)
        return rows

    async def in_transaction(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`work`'s statements in one transaction on a pooled connection, committed when it
        returns (rolled back when it raises); sent again whole on a deadlock or a serialization
        failure, as a single statement is; DuplicateKey as above. For the few requests that
        need a second statement after the first's answer (a keyed hold or capture records its
        response with its key)."""

        async def transaction(conn: asyncpg.Connection) -> T:
            for attempt in range(1, STATEMENT_ATTEMPTS + 1):
                try:
                    async with conn.transaction():
                        return await work(conn)
                except _TRANSIENT as exc:
                    # Safe to run again: PostgreSQL rolled the whole transaction back.
                    if attempt == STATEMENT_ATTEMPTS:
                        raise
                    STATEMENT_RETRIES.labels(exc.sqlstate).inc()
                    log.warning("statement_retried", sqlstate=exc.sqlstate, attempt=attempt)
            raise AssertionError("unreachable")

        async with self._connection() as conn:
            return await transaction(conn)

    async def _run(self, method: str, sql: str, args: Sequence[Any], read: bool) -> Any:
        """A statement that failed on a deadlock or a serialization failure is sent again (at
        most STATEMENT_ATTEMPTS times), transparently. A read that lost its connection is sent
        once more on a new one: a pooled connection whose server side ended while it was idle
        (a terminated backend, a restart) is found lost only by the next statement written to
        it, and a read changes nothing, so sending it again is always safe. A write is not
        (it may have committed before the answer was lost): its error stays the request's
        (503, and the client retries with its idempotency key)."""
        for attempt in (1, 2):
            try:
                async with self._connection() as conn:
                    return await self._send(conn, method, sql, args)
            except Exception as exc:
                if attempt == 2 or not read or not connection_unusable(exc):
                    raise
                STATEMENT_RETRIES.labels(_LOST).inc()
                log.warning("statement_retried", sqlstate=_LOST, attempt=attempt)
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection, in turn. A connection whose statement failed for any other
        reason than a constraint is closed rather than reused: nothing can tell a connection
        that survived from a lost one; a new one is opened in its place when needed.
        Connections are not reset when given back: the statements sent here are single
        autocommit statements (or one transaction that ends) that leave no session state
        behind (no SET, LISTEN, cursor or advisory lock)."""
        if self._turns.locked():  # all connections busy: wait for a turn, within bounds
            async with asyncio.timeout(POOL_TIMEOUT_SECONDS):
                await self._turns.acquire()
        else:
            await self._turns.acquire()  # returns at once: no timer to set up
        try:
            # A turn guarantees an idle connection or room for one, so this only waits when a
            # connection is opened (bounded by its connect timeout).
            conn, generation = await self._take()
            try:
                yield conn
            except asyncpg.UniqueViolationError as exc:
                raise DuplicateKey(str(exc)) from exc  # the connection is fine
            except asyncpg.IntegrityConstraintViolationError:
                raise
            except BaseException as exc:
                # Closed, lost or not (the statement's own error, not this one, reaches the
                # caller: a 503, not a 500).
                conn.terminate()
                if connection_unusable(exc):
                    # The server went away or is read-only (a failover demoted it): the other
                    # pooled connections lead there too. None is used again; new ones reach
                    # whatever the address now serves (the new primary, behind the proxy).
                    self._expire()
                raise
            finally:
                self._give_back(conn, generation)
        finally:
            self._turns.release()

    async def _take(self) -> tuple[asyncpg.Connection, int]:
        """The most recently used idle connection that may still be used, or a new one."""
        now = time.monotonic()
        while self._idle:
            conn, generation, since = self._idle.pop()
            if conn.is_closed() or generation != self._generation or now - since > IDLE_SECONDS:
                conn.terminate()
                continue
            return conn, generation
        generation = self._generation
        return await self._connect(), generation

    def _give_back(self, conn: asyncpg.Connection, generation: int) -> None:
        if conn.is_closed():
            return
        # Opened while the server was read-only: used once, never kept (its session would
        # refuse writes after the server is writable again: database_errors).
        if self._closed or generation != self._generation or opened_read_only(conn):
            conn.terminate()
            return
        self._idle.append((conn, generation, time.monotonic()))

    def _expire(self) -> None:
        """No connection opened until now is used again: the idle ones are closed now, the
        taken ones when given back."""
        self._generation += 1
        idle, self._idle = self._idle, []
        for conn, _generation, _since in idle:
            conn.terminate()

    @staticmethod
    async def _send(conn: asyncpg.Connection, method: str, sql: str, args: Sequence[Any]) -> Any:
        for attempt in range(1, STATEMENT_ATTEMPTS + 1):
            try:
                return await getattr(conn, method)(sql, *args)
            except _TRANSIENT as exc:
                # Safe to send again: every statement here is a single autocommit statement, so
                # PostgreSQL rolled all of it back (nothing changed), the connection is idle and
                # usable, and the statement that won the deadlock holds its locks only until its
                # commit, which the retry simply waits for.
                if attempt == STATEMENT_ATTEMPTS:
                    raise
                STATEMENT_RETRIES.labels(exc.sqlstate).inc()
                log.warning("statement_retried", sqlstate=exc.sqlstate, attempt=attempt)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        """Close the idle connections (gracefully, a few seconds at most each); the taken ones
        are closed when given back."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_close(conn) for conn, _generation, _since in idle))


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await conn.close(timeout=5)
    except Exception:  # the server away or slow: drop it without the goodbye
        conn.terminate()
