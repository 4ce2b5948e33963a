"""Holds and captures at charge speed: one statement each, batched like charges (lanes.py).

The statements are the money core's (ledger/statements.py, ledger/capture_statements.py):
a hold is ONE statement, the conditional UPDATE of the account taking `uses` from its wallet's
lots by the consumption rule into its reserved counters, feeding the INSERT of the reservation
row that names the lots; a capture is ONE statement that spends the held lots, gives the rest
back to them and writes the charge row. This module sends them.

Holds and captures that queue up go out together (HOLD_BATCH_SQL, CAPTURE_BATCH_SQL), one
round trip and one commit for many, each deciding for itself as if alone:
- a hold batch has at most one hold per account (the lane key), and locks the accounts by id,
  ascending, before updating them (the charges' lock order: overlapping batches wait, never
  deadlock);
- a capture batch takes at most one reservation per account (DISTINCT ON: an UPDATE ... FROM
  changes a row once); a capture the batch did not make is sent again alone.
Anything the statement does not make (no such active account, too few uses, suspended; no
such held, unexpired reservation, more uses than held) returns no row: the caller answers it
on the framework's path (accounts/reservation_answers.py), which says why.

With an Idempotency-Key (the agent client sends one with every hold and capture) the same
statements take the key (a row in idempotency_keys, in a CTE) and the answer is recorded with
it (RECORD_SQL, RECORD_BATCH_SQL) in the same transaction, before its one commit: a retry finds
the answer, never a key without one. A batch with keyed requests is that transaction for all
of them (one statement, one record, one commit), so keyed traffic batches like unkeyed; a key
taken twice in a batch, or racing its twin, fails the batch on the key's primary key
(DuplicateKey) and each request is sent again alone, getting its own answer (a replay or a 409
on the framework's path).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar

from ciris_billing.accounts.hot.lanes import Lanes, Waiting
from ciris_billing.accounts.hot.pool import DuplicateKey, StatementPool
from ciris_billing.ledger.capture_statements import CAPTURE_BATCH_SQL, CAPTURE_SQL
from ciris_billing.ledger.statements import (
    HOLD_BATCH_SQL,
    HOLD_HEAD_BATCH_SQL,
    HOLD_HEAD_SQL,
    HOLD_SQL,
    hold_batch_sql,
    hold_sql,
)

# A keyed hold's or capture's answer, recorded with its key in the same transaction.
RECORD_SQL = """
UPDATE idempotency_keys SET response_status = $3, response_body = $4
WHERE api_key_id = $1 AND key = $2
"""
# The same for a batch's keyed holds or captures: one element per answer.
RECORD_BATCH_SQL = """
UPDATE idempotency_keys k SET response_status = i.status, response_body = i.body
FROM unnest($1::text[], $2::text[], $3::int[], $4::text[]) AS i(api_key_id, key, status, body)
WHERE k.api_key_id = i.api_key_id AND k.key = i.key
"""


@dataclass(frozen=True, slots=True)
class Keyed:
    """A request's idempotency key, its fingerprint, and how its answer is rendered from the
    statement's row (status, JSON text): recorded with the key before the commit."""

    key: str
    fingerprint: str
    render: Callable[[Any], tuple[int, str]]


@dataclass(frozen=True, slots=True)
class HoldAttempt:
    """One hold as the store sends it; `keyed` when it carries an Idempotency-Key (its answer
    is then recorded with the key in the same transaction)."""

    oauth_provider: str
    external_id: str
    uses: int
    reservation_id: str
    api_key_id: str
    metadata_json: str
    at: datetime
    expires_at: datetime
    keyed: Keyed | None = None

    def parameters(self) -> tuple[Any, ...]:
        """$1..$8 of HOLD_SQL and HOLD_BATCH_SQL."""
        return (
            self.oauth_provider,
            self.external_id,
            self.uses,
            self.reservation_id,
            self.api_key_id,
            self.metadata_json,
            self.at,
            self.expires_at,
        )


@dataclass(frozen=True, slots=True)
class CaptureAttempt:
    """One capture as the store sends it (`keyed` as for holds)."""

    reservation_id: str
    uses: int | None
    charge_id: str
    at: datetime
    amount_minor: int
    description: str | None
    metadata_json: str
    api_key_id: str
    credit_id: str  # the owed_taken ledger row's id, used only when owed uses are paid off
    keyed: Keyed | None = None

    def parameters(self) -> tuple[Any, ...]:
        """$1..$9 of CAPTURE_SQL and CAPTURE_BATCH_SQL."""
        return (
            self.reservation_id,
            self.uses,
            self.charge_id,
            self.at,
            self.amount_minor,
            self.description,
            self.metadata_json,
            self.api_key_id,
            self.credit_id,
        )


Attempt = HoldAttempt | CaptureAttempt
A = TypeVar("A", HoldAttempt, CaptureAttempt)


class _ReservationLanes(Lanes[A]):
    """Holds or captures through a few concurrent statements, batching those that wait: `one`
    alone, `batch` for many; a request the batch did not make is sent again alone when
    `resend_unmade` (a capture the batch did not choose), else answered None."""

    resend_unmade = False

    def __init__(
        self,
        statement: str,
        statements: StatementPool,
        lanes: int,
        one: str,
        batch: str,
        head: tuple[str, str] | None = None,
    ) -> None:
        super().__init__(statement, lanes)
        self._statements = statements
        self._one, self._batch = one, batch
        # Holds: the walk's common case in plain SQL (ledger/statements.py), sent first; what
        # it makes no row for goes again with the walk's texts.
        self._head = head

    async def _send_one(self, waiting: Waiting[A]) -> None:
        made = None
        if self._head is not None:
            made = await _send_one(self._statements, self._head[0], waiting.request)
        if made is None:
            made = await _send_one(self._statements, self._one, waiting.request)
        waiting.settle(made)

    async def _send_many(self, batch: list[Waiting[A]]) -> None:
        # A batch that fails (a key taken twice: DuplicateKey, or any other error) has each
        # request sent again alone by Lanes._alone, each getting its own answer.
        if self._head is None:
            made = await _send_batch(self._statements, self._batch, batch)
        else:
            made = await _send_batch(self._statements, self._head[1], batch)
            rest = [w for w in batch if w.request.reservation_id not in made]
            if rest:
                made.update(await _send_batch(self._statements, self._batch, rest))
        for waiting in batch:
            found = made.get(waiting.request.reservation_id)
            if found is None and self.resend_unmade:
                await self._send_one(waiting)
            else:
                waiting.settle(found)


class HoldStore(_ReservationLanes[HoldAttempt]):
    """Makes holds through a few concurrent statements, batching those that wait."""

    def __init__(self, statements: StatementPool, lanes: int, *, monthly: bool = False) -> None:
        # monthly (FREE_USES_RESET=monthly): the statements also require the month's free lot.
        one, batch = (
            (hold_sql(True), hold_batch_sql(True)) if monthly else (HOLD_SQL, HOLD_BATCH_SQL)
        )
        head = (
            (hold_sql(True, head=True), hold_batch_sql(True, head=True))
            if monthly
            else (HOLD_HEAD_SQL, HOLD_HEAD_BATCH_SQL)
        )
        super().__init__("hold", statements, lanes, one, batch, head)

    async def hold(self, attempt: HoldAttempt) -> Any:
        """The account's row after the hold (counters, last_charge_free_uses: the free uses
        held), or None when it was not made (the framework's path says why)."""
        # One hold per account per batch (the lane key): an UPDATE ... FROM changes a row once.
        return await self.submit((attempt.oauth_provider, attempt.external_id), attempt)

    async def hold_keyed(self, attempt: HoldAttempt, keyed: Keyed) -> tuple[Any, str] | None:
        """A hold with an idempotency key, its answer recorded with the key in the transaction
        that makes it (alone, or with the batch it queued in): (the account's row, the
        answer's JSON text), or None when it was not made (the key taken already included:
        the framework's path replays or refuses)."""
        result: tuple[Any, str] | None = await self.hold(replace(attempt, keyed=keyed))
        return result


class CaptureStore(_ReservationLanes[CaptureAttempt]):
    """Makes captures through a few concurrent statements, batching those that wait."""

    # A batch takes one reservation per account (CAPTURE_BATCH_SQL's `chosen`); the others,
    # and any it could not capture, go again alone.
    resend_unmade = True

    def __init__(self, statements: StatementPool, lanes: int) -> None:
        super().__init__("capture", statements, lanes, CAPTURE_SQL, CAPTURE_BATCH_SQL)

    async def capture(self, attempt: CaptureAttempt) -> Any:
        """The captured charge and its account after it (a record), or None when it was not
        made (the framework's path says why)."""
        return await self.submit(attempt.reservation_id, attempt)

    async def capture_keyed(self, attempt: CaptureAttempt, keyed: Keyed) -> tuple[Any, str] | None:
        """A capture with an idempotency key, as HoldStore.hold_keyed."""
        result: tuple[Any, str] | None = await self.capture(replace(attempt, keyed=keyed))
        return result


async def _send_one(statements: StatementPool, sql: str, attempt: Attempt) -> Any:
    """One hold or capture alone: its row (keyed: the row and its answer's text) or None."""
    if attempt.keyed is not None:
        return await _keyed(statements, sql, attempt, attempt.keyed)
    return await statements.fetch_one(sql, (*attempt.parameters(), None, None))


async def _send_batch(
    statements: StatementPool,
    sql: str,
    batch: list[Waiting[A]],
) -> dict[str, Any]:
    """A batch in one statement: what each request it made gets, by reservation id (its row;
    a keyed request's row and answer text, the answers recorded with their keys before the one
    commit). DuplicateKey when a key was taken twice (nothing is made)."""
    attempts: list[Attempt] = [waiting.request for waiting in batch]
    keys = [(a.keyed.key, a.keyed.fingerprint) if a.keyed else (None, None) for a in attempts]
    columns = [
        list(column)
        for column in zip(
            *(a.parameters() + k for a, k in zip(attempts, keys, strict=True)), strict=True
        )
    ]
    if all(attempt.keyed is None for attempt in attempts):
        return {row["reservation_id"]: row for row in await statements.fetch_all(sql, columns)}
    by_id = {attempt.reservation_id: attempt for attempt in attempts}

    async def work(conn: Any) -> dict[str, Any]:
        made: dict[str, Any] = {}
        answers: list[tuple[str, str, int, str]] = []
        for row in await conn.fetch(sql, *columns):
            attempt = by_id[row["reservation_id"]]
            if attempt.keyed is None:
                made[attempt.reservation_id] = row
                continue
            status, text = attempt.keyed.render(row)
            answers.append((attempt.api_key_id, attempt.keyed.key, status, text))
            made[attempt.reservation_id] = (row, text)
        if answers:
            await conn.execute(RECORD_BATCH_SQL, *([list(c) for c in zip(*answers, strict=True)]))
        return made

    return await statements.in_transaction(work)


async def _keyed(
    statements: StatementPool, sql: str, attempt: Attempt, keyed: Keyed
) -> tuple[Any, str] | None:
    async def work(conn: Any) -> tuple[Any, str] | None:
        row = await conn.fetchrow(sql, *attempt.parameters(), keyed.key, keyed.fingerprint)
        if row is None:
            return None
        status, text = keyed.render(row)
        await conn.execute(RECORD_SQL, attempt.api_key_id, keyed.key, status, text)
        return row, text

    try:
        return await statements.in_transaction(work)
    except DuplicateKey:
        # Safe: the key's first use committed (the primary key waited for it); the framework's
        # path answers from it (a replay, or 409 for another request).
        return None


__all__ = [
    "CAPTURE_BATCH_SQL",
    "CAPTURE_SQL",
    "HOLD_BATCH_SQL",
    "HOLD_SQL",
    "RECORD_BATCH_SQL",
    "RECORD_SQL",
    "CaptureAttempt",
    "CaptureStore",
    "HoldAttempt",
    "HoldStore",
    "Keyed",
]
