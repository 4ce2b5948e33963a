"""Writing charges on PostgreSQL: one statement per charge, and charges that arrive together
written together.

A charge is one statement (CHARGE_SQL): the conditional UPDATE of the account feeds the INSERT
of the ledger row through a CTE, so it deducts only what is there and the row is written in the
same atomic statement. Under load most of PostgreSQL's work per charge is the statement and its
commit rather than the rows, so charges that queue up while every connection is busy are sent
together: BATCH_SQL applies the same UPDATE and INSERT to each of them in one statement — one
round trip, one commit. Each still deducts only from its own account's current balance (the
WHERE clause is per row), so the outcome for each charge is what it would be alone:

- a batch never holds two charges for one account (an UPDATE ... FROM updates a row only once;
  the second charge waits for the next batch), so a hot account is charged one at a time;
- a charge that cannot be made (no uses left, suspended, unknown, a retried key) simply returns
  no row, and its request takes the slow path as a single charge would;
- if the batch fails on a unique key (a retried idempotency key racing its twin), its charges
  are sent again one by one, each getting its own answer; any other failure is every member's.

Nothing is delayed to form a batch: a charge goes out at once when a lane is free; batches form
only from charges that arrived while all lanes were busy.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ciris_billing.db import DuplicateKey, StatementPool
from ciris_billing.observability import CHARGE_BATCH_SIZE

# $1 provider, $2 external id, $3 uses, $4 idempotency key, $5 charge id, $6 amount, $7 currency,
# $8 description, $9 metadata (JSON text), $10 request fingerprint, $11 now.
CHARGE_SQL = """
WITH spent AS (
    UPDATE accounts SET
        last_charge_free_uses =
            CASE WHEN free_uses_remaining >= $3 THEN $3 ELSE free_uses_remaining END,
        free_uses_remaining =
            CASE WHEN free_uses_remaining >= $3 THEN free_uses_remaining - $3 ELSE 0 END,
        paid_uses_remaining = CASE WHEN free_uses_remaining >= $3 THEN paid_uses_remaining
            ELSE paid_uses_remaining - ($3 - free_uses_remaining) END,
        total_uses = total_uses + $3,
        updated_at = $11
    WHERE oauth_provider = $1 AND external_id = $2 AND status = 'active'
      AND free_uses_remaining + paid_uses_remaining >= $3
      AND ($4::text IS NULL OR NOT EXISTS (SELECT 1 FROM idempotency_keys WHERE key = $4))
    RETURNING id, free_uses_remaining, paid_uses_remaining, total_uses,
              last_charge_free_uses, plan_name
), recorded AS (
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                         currency, description, metadata, idempotency_key, request_fingerprint,
                         free_uses_after, paid_uses_after, total_uses_after, created_at)
    SELECT $5, id, $3, last_charge_free_uses, $3 - last_charge_free_uses, $6, $7, $8, $9::json,
           $4, $10, free_uses_remaining, paid_uses_remaining, total_uses, $11
    FROM spent
)
SELECT * FROM spent
"""

# The same, for many charges: each parameter is an array with one element per charge, in the
# order above ($9 metadata as JSON text, $11 each charge's own time).
BATCH_SQL = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                         $6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::timestamptz[])
        AS i(oauth_provider, external_id, uses, idempotency_key, charge_id, amount_minor,
             currency, description, metadata, request_fingerprint, created_at)
), spent AS (
    UPDATE accounts a SET
        last_charge_free_uses =
            CASE WHEN a.free_uses_remaining >= i.uses THEN i.uses ELSE a.free_uses_remaining END,
        free_uses_remaining =
            CASE WHEN a.free_uses_remaining >= i.uses THEN a.free_uses_remaining - i.uses
            ELSE 0 END,
        paid_uses_remaining = CASE WHEN a.free_uses_remaining >= i.uses THEN a.paid_uses_remaining
            ELSE a.paid_uses_remaining - (i.uses - a.free_uses_remaining) END,
        total_uses = a.total_uses + i.uses,
        updated_at = i.created_at
    FROM input i
    WHERE a.oauth_provider = i.oauth_provider AND a.external_id = i.external_id
      AND a.status = 'active' AND a.free_uses_remaining + a.paid_uses_remaining >= i.uses
      AND (i.idempotency_key IS NULL
           OR NOT EXISTS (SELECT 1 FROM idempotency_keys k WHERE k.key = i.idempotency_key))
    RETURNING a.id, a.free_uses_remaining, a.paid_uses_remaining, a.total_uses,
              a.last_charge_free_uses, a.plan_name, i.*
), recorded AS (
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                         currency, description, metadata, idempotency_key, request_fingerprint,
                         free_uses_after, paid_uses_after, total_uses_after, created_at)
    SELECT charge_id, id, uses, last_charge_free_uses, uses - last_charge_free_uses,
           amount_minor, currency, description, metadata::json, idempotency_key,
           request_fingerprint, free_uses_remaining, paid_uses_remaining, total_uses, created_at
    FROM spent
)
SELECT charge_id, id, free_uses_remaining, paid_uses_remaining, total_uses,
       last_charge_free_uses, plan_name
FROM spent
"""

MAX_BATCH = 64


@dataclass(slots=True)
class _Waiting:
    arguments: tuple[Any, ...]  # CHARGE_SQL's, in order
    answer: asyncio.Future[Any] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def account(self) -> tuple[str, str]:
        return self.arguments[0], self.arguments[1]

    @property
    def charge_id(self) -> str:
        charge_id: str = self.arguments[4]
        return charge_id


class ChargeWriter:
    """Sends charges through `lanes` concurrent statements at most, batching those that wait."""

    def __init__(self, statements: StatementPool, lanes: int) -> None:
        self._statements = statements
        self._lanes = lanes
        self._busy = 0
        self._waiting: deque[_Waiting] = deque()
        self._tasks: set[asyncio.Task[None]] = set()

    async def charge(
        self,
        provider: str,
        external_id: str,
        uses: int,
        idempotency_key: str | None,
        charge_id: str,
        amount_minor: int,
        currency: str,
        description: str | None,
        metadata_json: str,
        fingerprint: str | None,
        now: datetime,
    ) -> Any:
        """The account's row after the charge (id, counters, plan_name), or None when it was
        not made; DuplicateKey when its idempotency key was already taken."""
        waiting = _Waiting(
            (
                provider,
                external_id,
                uses,
                idempotency_key,
                charge_id,
                amount_minor,
                currency,
                description,
                metadata_json,
                fingerprint,
                now,
            )
        )
        self._waiting.append(waiting)
        if self._busy < self._lanes:
            self._busy += 1
            task = _loop().create_task(self._lane())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await waiting.answer

    async def _lane(self) -> None:
        try:
            while self._waiting:
                await self._send(self._next_batch())
        finally:
            self._busy -= 1

    async def _send(self, batch: list[_Waiting]) -> None:
        """Answer every charge of the batch: its row, None, or the error that stopped it."""
        CHARGE_BATCH_SIZE.observe(len(batch))
        try:
            if len(batch) == 1:
                await self._send_one(batch[0])
            else:
                await self._send_many(batch)
        except asyncio.CancelledError:
            for waiting in batch:
                _fail(waiting, asyncio.CancelledError())
            raise
        except Exception as exc:  # answered to each waiting request, which raises it
            for waiting in batch:
                _fail(waiting, exc)

    def _next_batch(self) -> list[_Waiting]:
        """The oldest waiting charges, at most one per account (the others keep their place)."""
        batch: list[_Waiting] = []
        accounts: set[tuple[str, str]] = set()
        kept: list[_Waiting] = []
        while self._waiting and len(batch) < MAX_BATCH:
            waiting = self._waiting.popleft()
            if waiting.account in accounts:
                kept.append(waiting)
            else:
                accounts.add(waiting.account)
                batch.append(waiting)
        self._waiting.extendleft(reversed(kept))
        return batch

    async def _send_many(self, batch: list[_Waiting]) -> None:
        columns = [list(column) for column in zip(*(w.arguments for w in batch), strict=True)]
        try:
            rows = await self._statements.fetch_all(BATCH_SQL, columns)
        except DuplicateKey:
            for waiting in batch:  # which key? each charge alone gets its own answer
                await self._send_one(waiting)
            return
        made = {row["charge_id"]: row for row in rows}
        for waiting in batch:
            _answer(waiting, made.get(waiting.charge_id))

    async def _send_one(self, waiting: _Waiting) -> None:
        try:
            row = await self._statements.fetch_one(CHARGE_SQL, waiting.arguments)
        except DuplicateKey as exc:
            _fail(waiting, exc)
            return
        _answer(waiting, row)


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


def _answer(waiting: _Waiting, row: Any) -> None:
    if not waiting.answer.done():  # a request that went away no longer waits
        waiting.answer.set_result(row)


def _fail(waiting: _Waiting, exc: BaseException) -> None:
    if waiting.answer.done():
        return
    if isinstance(exc, asyncio.CancelledError):
        waiting.answer.cancel()
    else:
        waiting.answer.set_exception(exc)
