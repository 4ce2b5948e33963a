"""The unit of work: one transaction per request, committed once, before the answer is sent.

Routes (and the services they call) write only through `UnitOfWork.connection()`. The request's
dependency (deps.py `UnitOfWorkDep`) commits it after the route returns and before the response
is sent, so a client never sees a success that did not commit; an exception rolls it back, so a
failed request leaves nothing behind.

The one principled exception is `UnitOfWork.provider_call()`: a transaction is never held while
the payment provider answers (seconds, or a timeout), so what the request has done so far is
committed first and the next `connection()` opens a new transaction. It is the only place that
commits mid-request, besides the sandbox's test-clock advance (testclock/routes.py), which
commits and then waits for every process to read the new offset before it answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


class UnitOfWork:
    """A lazily opened transaction on `engine` (requests that read nothing open nothing)."""

    __slots__ = ("_conn", "_engine")

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._conn: AsyncConnection | None = None

    @property
    def engine(self) -> AsyncEngine:
        """For work that must outlive this unit's fate (its own unit of work, e.g. a failure
        record kept whatever becomes of the failed attempt)."""
        return self._engine

    async def connection(self) -> AsyncConnection:
        """The request's connection, inside its transaction (begun on first use)."""
        if self._conn is None:
            conn = await self._engine.connect()
            try:
                await conn.begin()
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        return self._conn

    async def commit(self) -> None:
        """Commit what was done (the dependency's exit, `provider_call` and the test clock's
        advance only)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.commit()
        finally:
            await conn.close()

    async def rollback(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await conn.rollback()
        finally:
            await conn.close()

    @asynccontextmanager
    async def provider_call(self) -> AsyncIterator[None]:
        """Around a call to the payment provider: commit first, hold no transaction meanwhile.

        What was written before must therefore already be safe on its own (e.g. a purchase row
        in its initial state, which reconcile can finish if the request dies during the call).
        """
        await self.commit()
        yield


@asynccontextmanager
async def unit_of_work(engine: AsyncEngine) -> AsyncIterator[UnitOfWork]:
    """A unit of work that commits when the block ends normally and rolls back otherwise."""
    work = UnitOfWork(engine)
    try:
        yield work
    except BaseException:
        await work.rollback()
        raise
    await work.commit()
