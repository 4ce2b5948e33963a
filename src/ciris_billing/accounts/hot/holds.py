"""Holds and captures at charge speed: one statement each, batched like charges (lanes.py).

A hold is ONE statement (HOLD_SQL): the conditional UPDATE of the account moves `uses` from its
available counters into its reserved ones (free uses first) and feeds the INSERT of the
reservation row through a CTE. The WHERE clause re-checks the balance on the locked row, so no
use is ever held twice and no counter goes below zero, as for a charge (hot/writer.py).

A capture is ONE statement (CAPTURE_SQL): the conditional UPDATE of the reservation
`WHERE status = 'held' AND expires_at > now` makes the transition exactly once (of racing
captures, releases and expiries only one finds it 'held'); it feeds the account's update (the
held uses leave the reserved counters, the captured ones are spent, free first, the rest come
back after paying off owed uses) and the INSERT of the charge row that references it, and of
the `owed_taken` ledger row when owed uses were paid off. Lock order: the reservation's row,
then the account's (as every other transition: accounts/reservations.py).

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

from ciris_billing.accounts.hot.crossings import alerted, crossing_columns, next_sequence
from ciris_billing.accounts.hot.lanes import Lanes, Waiting
from ciris_billing.accounts.hot.pool import DuplicateKey, StatementPool


def _key_unused(key: str, api_key_id: str) -> str:
    """SQL: the idempotency key is NULL (none sent), or neither a request's answer nor a charge
    has taken it under this API key (or under the legacy scope '')."""
    return f"""({key} IS NULL OR (
          NOT EXISTS (SELECT 1 FROM idempotency_keys k
                      WHERE k.api_key_id IN ({api_key_id}, '') AND k.key = {key})
          AND NOT EXISTS (SELECT 1 FROM charges c
                          WHERE c.api_key_id IN ({api_key_id}, '')
                            AND c.idempotency_key = {key})))"""  # noqa: S608 (our own constants)


def _claim(source: str, api_key_id: str, key: str, fingerprint: str, at: str) -> str:
    """SQL (a CTE's body): the key taken for each row of `source` that has one, its answer left
    to RECORD_SQL / RECORD_BATCH_SQL before the commit; a twin taking it too (in the batch or
    racing it) fails on the key's primary key (DuplicateKey)."""
    return f"""INSERT INTO idempotency_keys (api_key_id, key, fingerprint, response_status,
                                  response_body, created_at)
    SELECT {api_key_id}, {key}, {fingerprint}, 0, '', {at} FROM {source}
    WHERE {key} IS NOT NULL"""  # noqa: S608 (our own constants)


# $1 provider, $2 external id, $3 uses, $4 reservation id, $5 API key id, $6 metadata (JSON
# text), $7 now, $8 expires_at, $9 idempotency key (or NULL), $10 the request's fingerprint.
# SET sees the old counters: last_charge_free_uses keeps how many of the held uses were free
# (as it keeps a charge's split), for the reservation row.
HOLD_SQL = f"""
WITH held AS (
    UPDATE accounts a SET
        last_charge_free_uses = LEAST(a.free_uses_remaining, $3::bigint),
        reserved_free_uses = a.reserved_free_uses + LEAST(a.free_uses_remaining, $3::bigint),
        reserved_paid_uses =
            a.reserved_paid_uses + $3::bigint - LEAST(a.free_uses_remaining, $3::bigint),
        free_uses_remaining = a.free_uses_remaining - LEAST(a.free_uses_remaining, $3::bigint),
        paid_uses_remaining =
            a.paid_uses_remaining - ($3::bigint - LEAST(a.free_uses_remaining, $3::bigint)),
        -- A hold takes available uses: balance events as a charge's (crossings.py).
        {next_sequence("a.", "$3::bigint")},
        updated_at = $7::timestamptz
    WHERE a.oauth_provider = $1::text AND a.external_id = $2::text AND a.status = 'active'
      AND a.free_uses_remaining + a.paid_uses_remaining >= $3::bigint
      AND {_key_unused("$9::text", "$5::text")}
    RETURNING a.id AS account_id, a.free_uses_remaining, a.paid_uses_remaining,
              a.reserved_free_uses, a.reserved_paid_uses, a.total_uses,
              a.last_charge_free_uses, {crossing_columns("a.")},
              $3::bigint AS uses, $7::timestamptz AS created_at
), claimed AS (
    {_claim("held", "$5::text", "$9::text", "$10::text", "$7::timestamptz")}
), made AS (
    INSERT INTO reservations (id, account_id, api_key_id, status, uses, free_uses_held,
                              paid_uses_held, expires_at, metadata, idempotency_key,
                              created_at, updated_at)
    SELECT $4::text, account_id, $5::text, 'held', $3::bigint, last_charge_free_uses,
           $3::bigint - last_charge_free_uses, $8::timestamptz, $6::json, $9::text,
           $7::timestamptz, $7::timestamptz
    FROM held
), {alerted("held", "account_id")}
SELECT $4::text AS reservation_id, account_id, free_uses_remaining, paid_uses_remaining,
       reserved_free_uses, reserved_paid_uses, total_uses, last_charge_free_uses
FROM held
"""  # noqa: S608 (our own constants, no input)

# The same for many holds: each parameter an array, one element per hold, in the same order.
HOLD_BATCH_SQL = f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                         $6::text[], $7::timestamptz[], $8::timestamptz[], $9::text[],
                         $10::text[])
        AS i(oauth_provider, external_id, uses, reservation_id, api_key_id, metadata, at,
             expires_at, idempotency_key, fingerprint)
), locked AS MATERIALIZED (
    -- The charges' lock order: the batch's accounts locked by id, ascending, before any is
    -- updated (LockRows runs above the Sort), so overlapping batches wait instead of
    -- deadlocking. The UPDATE below touches only these rows.
    SELECT a.id AS locked_id, i.*
    FROM accounts a
    JOIN input i ON a.oauth_provider = i.oauth_provider AND a.external_id = i.external_id
    ORDER BY a.id
    FOR UPDATE OF a
), held AS (
    UPDATE accounts a SET
        last_charge_free_uses = LEAST(a.free_uses_remaining, i.uses),
        reserved_free_uses = a.reserved_free_uses + LEAST(a.free_uses_remaining, i.uses),
        reserved_paid_uses =
            a.reserved_paid_uses + i.uses - LEAST(a.free_uses_remaining, i.uses),
        free_uses_remaining = a.free_uses_remaining - LEAST(a.free_uses_remaining, i.uses),
        paid_uses_remaining =
            a.paid_uses_remaining - (i.uses - LEAST(a.free_uses_remaining, i.uses)),
        {next_sequence("a.", "i.uses")},
        updated_at = i.at
    FROM locked i
    WHERE a.id = i.locked_id AND a.status = 'active'
      AND a.free_uses_remaining + a.paid_uses_remaining >= i.uses
      AND {_key_unused("i.idempotency_key", "i.api_key_id")}
    RETURNING a.id AS account_id, a.free_uses_remaining, a.paid_uses_remaining,
              a.reserved_free_uses, a.reserved_paid_uses, a.total_uses,
              a.last_charge_free_uses, i.reservation_id, i.uses, i.api_key_id, i.metadata, i.at,
              i.expires_at, i.idempotency_key, i.fingerprint, {crossing_columns("a.")},
              i.at AS created_at
), claimed AS (
    {_claim("held", "api_key_id", "idempotency_key", "fingerprint", "at")}
), made AS (
    INSERT INTO reservations (id, account_id, api_key_id, status, uses, free_uses_held,
                              paid_uses_held, expires_at, metadata, idempotency_key,
                              created_at, updated_at)
    SELECT reservation_id, account_id, api_key_id, 'held', uses, last_charge_free_uses,
           uses - last_charge_free_uses, expires_at, metadata::json, idempotency_key, at, at
    FROM held
), {alerted("held", "account_id")}
SELECT reservation_id, account_id, free_uses_remaining, paid_uses_remaining,
       reserved_free_uses, reserved_paid_uses, total_uses, last_charge_free_uses
FROM held
"""  # noqa: S608 (our own constants, no input)

# $1 reservation id, $2 uses (NULL: all), $3 charge id, $4 now, $5 amount, $6 description,
# $7 metadata (JSON text, merged over the hold's), $8 API key id, $9 ledger row id (owed),
# $10 idempotency key (or NULL), $11 the request's fingerprint.
CAPTURE_SQL = f"""
WITH won AS (
    -- Safe: exactly once. Of racing captures / releases / expiries only one finds the row
    -- 'held' (the row lock makes the others re-check and see the winner's status).
    UPDATE reservations r SET status = 'captured',
        captured_uses = COALESCE($2::bigint, r.uses), charge_id = $3::text,
        updated_at = $4::timestamptz, closed_at = $4::timestamptz
    WHERE r.id = $1::text AND r.status = 'held' AND r.expires_at > $4::timestamptz
      AND r.uses >= COALESCE($2::bigint, r.uses)
      -- A hold owing uses to a dispute ends on the framework's path (reservations.py): the
      -- uses it gives back go into the dispute's hold. Read on the locked row's last version.
      AND r.owed_uses = 0
      AND {_key_unused("$10::text", "$8::text")}
    RETURNING r.id AS reservation_id, r.account_id, r.uses, r.captured_uses,
              r.free_uses_held, r.paid_uses_held, r.metadata, $3::text AS charge_id,
              $9::text AS credit_id, $5::bigint AS amount_minor, $6::text AS description,
              $7::text AS extra, $8::text AS api_key_id, $4::timestamptz AS at
)
, locked AS MATERIALIZED (
    -- The account's row, locked after the reservation's (the one lock order of holds), by id
    -- ascending across a batch; read under the lock: the owed uses to pay off.
    SELECT w.*, a.refund_owed_uses AS owed,
           LEAST(w.captured_uses, w.free_uses_held) AS free_used
    FROM accounts a JOIN won w ON a.id = w.account_id
    ORDER BY a.id
    FOR UPDATE OF a
), settled AS (
    -- reservations.owed_after: the paid uses coming back pay off owed uses first.
    SELECT l.*, l.captured_uses - l.free_used AS paid_used,
           LEAST(l.owed, l.paid_uses_held - (l.captured_uses - l.free_used)) AS paid_off
    FROM locked l
), spent AS (
    UPDATE accounts a SET
        reserved_free_uses = a.reserved_free_uses - s.free_uses_held,
        reserved_paid_uses = a.reserved_paid_uses - s.paid_uses_held,
        free_uses_remaining = a.free_uses_remaining + s.free_uses_held - s.free_used,
        paid_uses_remaining =
            a.paid_uses_remaining + s.paid_uses_held - s.paid_used - s.paid_off,
        -- No more stays owed than is still held: a captured hold's uses were spent.
        refund_owed_uses = LEAST(s.owed - s.paid_off, a.reserved_paid_uses - s.paid_uses_held),
        total_uses = a.total_uses + s.captured_uses,
        updated_at = s.at
    FROM settled s
    WHERE a.id = s.account_id
    RETURNING a.id AS account_id, a.oauth_provider, a.external_id, a.currency, a.plan_name,
              a.free_uses_remaining, a.paid_uses_remaining, a.reserved_free_uses,
              a.reserved_paid_uses, a.total_uses, s.reservation_id, s.uses AS held_uses_of,
              s.captured_uses, s.free_used, s.paid_used, s.paid_off, s.charge_id, s.credit_id,
              s.amount_minor, s.description, s.metadata AS held_metadata, s.extra, s.api_key_id,
              s.at
), recorded AS (
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                         currency, description, metadata, api_key_id, reservation_id,
                         free_uses_after, paid_uses_after, total_uses_after, created_at)
    SELECT charge_id, account_id, captured_uses, free_used, paid_used, amount_minor, currency,
           description, (held_metadata::jsonb || extra::jsonb)::json, api_key_id,
           reservation_id, free_uses_remaining, paid_uses_remaining, total_uses, at
    FROM spent
), repaid AS (
    INSERT INTO credits (id, account_id, kind, free_uses_delta, paid_uses_delta,
                         held_uses_delta, shortfall_uses, amount_minor, currency, description,
                         created_at)
    SELECT credit_id, account_id, 'owed_taken', 0, -paid_off, 0, 0, 0, currency,
           paid_off || ' paid uses owed to a refund or a lost dispute, taken when held uses '
           || 'came back (' || reservation_id || ')', at
    FROM spent WHERE paid_off > 0
), claimed AS (
    {_claim("spent", "$8::text", "$10::text", "$11::text", "$4::timestamptz")}
)
SELECT reservation_id, account_id, oauth_provider, external_id, currency, plan_name,
       free_uses_remaining, paid_uses_remaining, reserved_free_uses, reserved_paid_uses,
       total_uses, held_uses_of, captured_uses, free_used, paid_used, charge_id,
       held_metadata::text AS held_metadata
FROM spent
"""  # noqa: S608 (our own constants, no input)

# The same for many captures: each parameter an array, one element per capture.
CAPTURE_BATCH_SQL = f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::timestamptz[],
                         $5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[],
                         $10::text[], $11::text[])
        AS i(reservation_id, uses, charge_id, at, amount_minor, description, extra,
             api_key_id, credit_id, idempotency_key, fingerprint)
), chosen AS (
    -- One reservation per account (an UPDATE ... FROM changes an account's row once): the
    -- others come back without a row and are sent again alone.
    SELECT DISTINCT ON (r.account_id) r.id
    FROM reservations r JOIN input i ON r.id = i.reservation_id
    ORDER BY r.account_id, r.id
), won AS (
    -- Safe: exactly once, as CAPTURE_SQL.
    UPDATE reservations r SET status = 'captured',
        captured_uses = COALESCE(i.uses, r.uses), charge_id = i.charge_id,
        updated_at = i.at, closed_at = i.at
    FROM input i
    WHERE r.id = i.reservation_id AND r.id IN (SELECT id FROM chosen)
      AND r.status = 'held' AND r.expires_at > i.at AND r.uses >= COALESCE(i.uses, r.uses)
      AND r.owed_uses = 0  -- as CAPTURE_SQL: a hold owing a dispute goes the framework's path
      AND {_key_unused("i.idempotency_key", "i.api_key_id")}
    RETURNING r.id AS reservation_id, r.account_id, r.uses, r.captured_uses,
              r.free_uses_held, r.paid_uses_held, r.metadata, i.charge_id, i.credit_id,
              i.amount_minor, i.description, i.extra, i.api_key_id, i.at, i.idempotency_key,
              i.fingerprint
)
, locked AS MATERIALIZED (
    -- The account's row, locked after the reservation's (the one lock order of holds), by id
    -- ascending across a batch; read under the lock: the owed uses to pay off.
    SELECT w.*, a.refund_owed_uses AS owed,
           LEAST(w.captured_uses, w.free_uses_held) AS free_used
    FROM accounts a JOIN won w ON a.id = w.account_id
    ORDER BY a.id
    FOR UPDATE OF a
), settled AS (
    -- reservations.owed_after: the paid uses coming back pay off owed uses first.
    SELECT l.*, l.captured_uses - l.free_used AS paid_used,
           LEAST(l.owed, l.paid_uses_held - (l.captured_uses - l.free_used)) AS paid_off
    FROM locked l
), spent AS (
    UPDATE accounts a SET
        reserved_free_uses = a.reserved_free_uses - s.free_uses_held,
        reserved_paid_uses = a.reserved_paid_uses - s.paid_uses_held,
        free_uses_remaining = a.free_uses_remaining + s.free_uses_held - s.free_used,
        paid_uses_remaining =
            a.paid_uses_remaining + s.paid_uses_held - s.paid_used - s.paid_off,
        -- No more stays owed than is still held: a captured hold's uses were spent.
        refund_owed_uses = LEAST(s.owed - s.paid_off, a.reserved_paid_uses - s.paid_uses_held),
        total_uses = a.total_uses + s.captured_uses,
        updated_at = s.at
    FROM settled s
    WHERE a.id = s.account_id
    RETURNING a.id AS account_id, a.oauth_provider, a.external_id, a.currency, a.plan_name,
              a.free_uses_remaining, a.paid_uses_remaining, a.reserved_free_uses,
              a.reserved_paid_uses, a.total_uses, s.reservation_id, s.uses AS held_uses_of,
              s.captured_uses, s.free_used, s.paid_used, s.paid_off, s.charge_id, s.credit_id,
              s.amount_minor, s.description, s.metadata AS held_metadata, s.extra, s.api_key_id,
              s.at, s.idempotency_key, s.fingerprint
), recorded AS (
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                         currency, description, metadata, api_key_id, reservation_id,
                         free_uses_after, paid_uses_after, total_uses_after, created_at)
    SELECT charge_id, account_id, captured_uses, free_used, paid_used, amount_minor, currency,
           description, (held_metadata::jsonb || extra::jsonb)::json, api_key_id,
           reservation_id, free_uses_remaining, paid_uses_remaining, total_uses, at
    FROM spent
), repaid AS (
    INSERT INTO credits (id, account_id, kind, free_uses_delta, paid_uses_delta,
                         held_uses_delta, shortfall_uses, amount_minor, currency, description,
                         created_at)
    SELECT credit_id, account_id, 'owed_taken', 0, -paid_off, 0, 0, 0, currency,
           paid_off || ' paid uses owed to a refund or a lost dispute, taken when held uses '
           || 'came back (' || reservation_id || ')', at
    FROM spent WHERE paid_off > 0
), claimed AS (
    {_claim("spent", "api_key_id", "idempotency_key", "fingerprint", "at")}
)
SELECT reservation_id, account_id, oauth_provider, external_id, currency, plan_name,
       free_uses_remaining, paid_uses_remaining, reserved_free_uses, reserved_paid_uses,
       total_uses, held_uses_of, captured_uses, free_used, paid_used, charge_id,
       held_metadata::text AS held_metadata
FROM spent
"""  # noqa: S608 (our own constants, no input)


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
        self, statement: str, statements: StatementPool, lanes: int, one: str, batch: str
    ) -> None:
        super().__init__(statement, lanes)
        self._statements = statements
        self._one, self._batch = one, batch

    async def _send_one(self, waiting: Waiting[A]) -> None:
        waiting.settle(await _send_one(self._statements, self._one, waiting.request))

    async def _send_many(self, batch: list[Waiting[A]]) -> None:
        # A batch that fails (a key taken twice: DuplicateKey, or any other error) has each
        # request sent again alone by Lanes._alone, each getting its own answer.
        made = await _send_batch(self._statements, self._batch, batch)
        for waiting in batch:
            found = made.get(waiting.request.reservation_id)
            if found is None and self.resend_unmade:
                await self._send_one(waiting)
            else:
                waiting.settle(found)


class HoldStore(_ReservationLanes[HoldAttempt]):
    """Makes holds through a few concurrent statements, batching those that wait."""

    def __init__(self, statements: StatementPool, lanes: int) -> None:
        super().__init__("hold", statements, lanes, HOLD_SQL, HOLD_BATCH_SQL)

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
