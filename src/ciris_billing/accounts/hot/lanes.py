"""Lanes: at most N statements of one kind in flight; requests that arrive while every lane is
busy wait, and the next free lane sends all of them together in one statement.

Nothing is delayed to form a batch: a request goes out at once when a lane is free; batches
form only from requests that arrived while all lanes were busy, so under load one round trip
(and, for writes, one commit) serves many requests. A batch never holds two requests with the
same key (for charges: the same account), so each request's outcome is what it would be alone;
if a batch's statement fails, whatever the error, each of its requests is sent again alone
(Lanes._alone): one bad member never fails the others. Subclasses say how to send one request
and how to send a batch.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

from ciris_billing.database_errors import connection_unusable
from ciris_billing.observability import BATCH_SIZE

Asked = TypeVar("Asked")  # what one request in line asks for

MAX_BATCH = 64


class Waiting(Generic[Asked]):
    """One request in line: what it asks (a small frozen dataclass, read by field name) and the
    future its answer goes to."""

    __slots__ = ("answer", "key", "request")

    def __init__(self, key: Hashable, request: Asked) -> None:
        self.key = key
        self.request = request
        self.answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def settle(self, result: Any) -> None:
        if not self.answer.done():  # a request that went away no longer waits
            self.answer.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if self.answer.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            self.answer.cancel()
        else:
            self.answer.set_exception(exc)


class Lanes(Generic[Asked]):
    """`lanes` concurrent statements at most, named `statement` in the batch-size metric."""

    def __init__(self, statement: str, lanes: int) -> None:
        self._batch_size = BATCH_SIZE.labels(statement)
        self._lanes = lanes
        self._busy = 0
        self._waiting: deque[Waiting[Asked]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, key: Hashable, request: Asked) -> Any:
        """Wait in line; the answer `_send_one` / `_send_many` gave this request."""
        waiting = Waiting(key, request)
        self._waiting.append(waiting)
        if self._busy < self._lanes:
            self._busy += 1
            task = asyncio.get_running_loop().create_task(self._lane())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await waiting.answer

    async def _lane(self) -> None:
        try:
            while self._waiting:
                await self._send(self._next_batch())
        finally:
            self._busy -= 1

    def _next_batch(self) -> list[Waiting[Asked]]:
        """The oldest waiting requests, at most one per key (the others keep their place)."""
        batch: list[Waiting[Asked]] = []
        keys: set[Hashable] = set()
        kept: list[Waiting[Asked]] = []
        while self._waiting and len(batch) < MAX_BATCH:
            waiting = self._waiting.popleft()
            if waiting.key in keys:
                kept.append(waiting)
            else:
                keys.add(waiting.key)
                batch.append(waiting)
        self._waiting.extendleft(reversed(kept))
        return batch

    async def _send(self, batch: list[Waiting[Asked]]) -> None:
        """Answer every request of the batch: its result, or the error that stopped it."""
        self._batch_size.observe(len(batch))
        try:
            if len(batch) == 1:
                await self._send_one(batch[0])
            else:
                await self._send_many(batch)
        except asyncio.CancelledError:
            for waiting in batch:
                waiting.fail(asyncio.CancelledError())
            raise
        except Exception as exc:
            if len(batch) == 1:
                batch[0].fail(exc)
            else:
                await self._alone(batch, exc)

    async def _alone(self, batch: list[Waiting[Asked]], failed: Exception) -> None:
        """A batch's statement failed, whatever the error: each request it has not answered
        goes again alone, so one bad member (text the database refuses, a key taken twice)
        never fails the others. Safe: the server refused the statement, so its transaction
        made nothing. Not when the connection failed instead (connection_unusable): the batch
        may have committed before the answer was lost, and the database is likely away, so
        the members left get that error (as before) rather than being made twice."""
        unreachable = connection_unusable(failed)
        for waiting in batch:
            if waiting.answer.done():  # answered, or its request went away
                continue
            if unreachable:
                waiting.fail(failed)
                continue
            try:
                await self._send_one(waiting)
            except asyncio.CancelledError:
                for left in batch:
                    left.fail(asyncio.CancelledError())
                raise
            except Exception as exc:  # this member's own error
                waiting.fail(exc)
                unreachable = connection_unusable(exc)
                failed = exc

    async def _send_one(self, waiting: Waiting[Asked]) -> None:
        raise NotImplementedError

    async def _send_many(self, batch: list[Waiting[Asked]]) -> None:
        raise NotImplementedError
