"""The hot statements of the money core: a charge and a hold (each alone and batched), rendered
from the one consumption rule (rules.py).

Each is ONE statement: the conditional UPDATE of the account row takes the uses from its
wallet (`rules.walk_assignment`, guarded by `rules.can_take` in the same WHERE: the walk runs
on the locked row, re-checked by PostgreSQL when a concurrent statement changed it, so it never
takes a use twice and no lot goes below 0) and feeds, through CTEs, the INSERT of the movement
row that names its lots (`rules.touched_lots`), the balance events (accounts/hot/crossings.py)
and, for holds, the idempotency key's claim. tests/ledger/test_rules.py renders every one of
them and checks that each contains the rule's clauses.

A charge and a hold (alone and batched) also come as a `head` text: the walk's common case in
plain SQL, the first lot with uses left giving them all (`rules.head_covers`,
`rules.head_assignment`). PostgreSQL compiles every expression and sets up every subquery of a
statement on each run, so a function call or a subquery costs even when its branch is not
taken; the head text has none. The charge and hold stores (accounts/hot/writer.py, holds.py)
send it first and, for one it makes no row for (the uses span lots, the head lot expired, not
enough uses, a key already taken), the walk's text. Measured with callgrind on one PostgreSQL
backend (instructions per charge, 1,000 accounts each with a used-up free lot and a paid lot):
820k before lots, 1,189k with the walk and the touched lots as three function calls, ~980k
for the head text.

A statement also requires the account's free period, when it has one, to be the month of its
time (`rules.free_period_current`, a column compare): an account whose month's free lot is not
there yet gets no row, and the slow path adds it (ledger/free_periods.py) and sends the
statement again. With FREE_USES_RESET=monthly every account has a period (the `monthly=True`
texts); by default (the guide: free uses once) only accounts on a monthly plan (catalog).

Captures are in capture_statements.py; the cold movements (holds given back on release and
expiry, the framework's hold and capture) in holds.py.
"""

from __future__ import annotations

from typing import Literal

from ciris_billing.accounts.hot.crossings import alerted, crossing_columns, next_sequence
from ciris_billing.events.outbox import THRESHOLD_SQL
from ciris_billing.ledger.carry import carry_assignment, carry_uses, taken_uses
from ciris_billing.ledger.rules import (
    can_take,
    free_period_current,
    head_assignment,
    head_covers,
    touched_lots,
    walk_assignment,
)

# A rated charge's rounding (ledger/carry.py); None: a charge in uses.
Rated = Literal["up", "carry"] | None


def _period(row: str, at: str, monthly: bool) -> str:
    """The WHERE condition of the free period: every account's (FREE_USES_RESET=monthly), or
    that of an account on a monthly plan (the others have no period)."""
    return f"AND {free_period_current(row, at, everyone=monthly)}"


def usable_columns(row: str, at: str) -> str:
    """SQL (two RETURNING items): the free and other uses the account can give after the
    statement, at its time: its counters, or past next_expiry_at what its unexpired lots hold
    (`ledger_usable`; the counters still include lots expired and not yet swept by the expiry
    job). What the answer and the movement row's *_after report; balance events keep comparing
    counters."""

    def side(free: bool) -> str:
        counter = "free_uses_remaining" if free else "paid_uses_remaining"
        return f"""CASE WHEN {row}next_expiry_at IS NULL OR {row}next_expiry_at > {at}
                THEN {row}{counter} ELSE ledger_usable({row}lot_left, {row}lot_kinds,
                {row}lot_expires, {at}, {str(free).lower()}) END"""

    return f"{side(True)} AS usable_free, {side(False)} AS usable_other"


def next_check_columns(row: str) -> str:
    """SQL (RETURNING items): what a credit check of the account would read after the
    statement, besides the counters it returns already: the held uses and, when something in
    the wallet expires, the wallet (as `wallet_*`; NULL otherwise, no bytes). A charge's answer
    carries that check's answer (accounts/answers.py), so an agent need not send it."""
    wallet = ", ".join(
        f"CASE WHEN {row}next_expiry_at IS NULL THEN NULL ELSE {row}lot_{column} END"
        f" AS wallet_{column}"
        for column in ("left", "kinds", "expires")
    )
    return f"{row}reserved_free_uses, {row}reserved_paid_uses, {row}next_expiry_at, {wallet}"


# The next check's columns, as the charge statements' last SELECT passes them on.
NEXT_CHECK = (
    "reserved_free_uses, reserved_paid_uses, next_expiry_at, wallet_left, wallet_kinds, "
    "wallet_expires"
)


def key_unused(key: str, api_key_id: str) -> str:
    """SQL: the idempotency key is NULL (none sent), or neither a request's answer nor a charge
    has taken it under this API key (or under the legacy scope '')."""
    return f"""({key} IS NULL OR (
          NOT EXISTS (SELECT 1 FROM idempotency_keys k
                      WHERE k.api_key_id IN ({api_key_id}, '') AND k.key = {key})
          AND NOT EXISTS (SELECT 1 FROM charges c
                          WHERE c.api_key_id IN ({api_key_id}, '')
                            AND c.idempotency_key = {key})))"""  # noqa: S608 (our own constants)


def claim(source: str, api_key_id: str, key: str, fingerprint: str, at: str) -> str:
    """SQL (a CTE's body): the key taken for each row of `source` that has one, its answer left
    to RECORD_SQL / RECORD_BATCH_SQL before the commit; a twin taking it too (in the batch or
    racing it) fails on the key's primary key (DuplicateKey)."""
    return f"""INSERT INTO idempotency_keys (api_key_id, key, fingerprint, response_status,
                                  response_body, created_at)
    SELECT {api_key_id}, {key}, {fingerprint}, 0, '', {at} FROM {source}
    WHERE {key} IS NOT NULL"""  # noqa: S608 (our own constants)


# A charge. $1 provider, $2 external id, $3 uses, $4 idempotency key, $5 charge id, $6 amount,
# $7 currency, $8 description, $9 metadata (JSON text), $10 request fingerprint, $11 the
# charge's time, $12 the API key's id (the idempotency key's scope; '' = LEGACY_SCOPE, keys
# from before scoping, which are everyone's to refuse).
# A rated charge (ledger/carry.py) adds $13 the feature and, `up`: $14 the quantity ($3 the
# uses, rounded up in Python); `carry`: $3 is the quantity and $14 the units per use, the uses
# computed from the locked row's carry (the head text also records a charge that completes
# none, with 0 uses: `_enough`). Rated texts also return `uses`.
def charge_sql(monthly: bool = False, head: bool = False, rated: Rated = None) -> str:
    at = "$11::timestamptz"
    carry = rated == "carry"
    uses = carry_uses("", "$13::text", "$3::bigint", "$14::bigint") if carry else "$3::bigint"
    take = head_assignment("", uses, maybe_none=carry) if head else walk_assignment("", uses, at)
    enough = _enough("", uses, at, head, carry)
    kept = carry_assignment("", "$13::text", "$3::bigint", "$14::bigint") + ",\n        "
    returned = taken_uses("", head) if carry else uses
    took = "uses" if carry else uses
    columns = _RATED_COLUMNS if rated else ""
    return f"""
WITH spent AS (
    UPDATE accounts SET
        {take},
        {kept if carry else ""}total_uses = total_uses + {uses},
        {next_sequence("", uses)},
        updated_at = {at}
    WHERE oauth_provider = $1 AND external_id = $2 AND status = 'active' AND currency = $7
      AND {enough}
      {_period("", at, monthly)}
      AND ($4::text IS NULL OR NOT EXISTS (
          SELECT 1 FROM idempotency_keys WHERE api_key_id IN ($12::text, '') AND key = $4))
    RETURNING id, free_uses_remaining, paid_uses_remaining, total_uses,
              last_charge_free_uses, plan_name, {crossing_columns("")}, {touched_lots("")},
              {usable_columns("", at)}, {returned} AS uses, {at} AS created_at,
              {next_check_columns("")}
), recorded AS (
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                         currency, description, metadata, api_key_id, idempotency_key,
                         request_fingerprint, free_uses_after, paid_uses_after,
                         total_uses_after, lot_ids, lot_uses, {columns}created_at)
    SELECT $5, id, {took}, last_charge_free_uses, {took} - last_charge_free_uses, $6, $7, $8,
           $9::json, $12, $4, $10, usable_free, usable_other, total_uses, lot_ids, lot_uses,
           {_rated_values(rated)}{at}
    FROM spent
), {alerted("spent", "id")}
SELECT id, usable_free AS free_uses_remaining, usable_other AS paid_uses_remaining, total_uses,
       last_charge_free_uses, plan_name, lot_ids, lot_uses{", uses" if rated else ""},
       {NEXT_CHECK}
FROM spent
"""  # noqa: S608 (our own constants, no input)


def _enough(row: str, uses: str, at: str, head: bool, carry: bool) -> str:
    """The WHERE condition on the wallet. A `carry` head text also makes the charge that
    completes no use (the remainder kept, 0 uses, no lot: one statement whatever the carry
    makes of the quantity); a `carry` walk text only one that completes a use (the walk takes
    at least one)."""
    if not head:
        return can_take(row, uses, at) + (f" AND {uses} > 0" if carry else "")
    covers = head_covers(row, uses, at)
    return f"({uses} = 0 OR {covers})" if carry else covers


_RATED_COLUMNS = "feature, quantity, "


def _rated_values(rated: Rated, batch: bool = False) -> str:
    """The INSERT's feature and quantity values of a rated text ('' for a plain one)."""
    if rated is None:
        return ""
    if batch:
        return "feature, quantity, "
    return "$13::text, $14::bigint, " if rated == "up" else "$13::text, $3::bigint, "


# The same for many charges: each parameter is an array with one element per charge, in the
# same order ($9 metadata as JSON text, $11 each charge's own time, $12 its API key's id; a
# rated text's $13 and $14 as charge_sql's, and for `carry` $3 the quantities).
def charge_batch_sql(monthly: bool = False, head: bool = False, rated: Rated = None) -> str:
    at = "i.created_at"
    carry = rated == "carry"
    uses = carry_uses("a.", "i.feature", "i.quantity", "i.units") if carry else "i.uses"
    take = (
        head_assignment("a.", uses, maybe_none=carry) if head else walk_assignment("a.", uses, at)
    )
    enough = _enough("a.", uses, at, head, carry)
    kept = carry_assignment("a.", "i.feature", "i.quantity", "i.units") + ",\n        "
    first = "quantity" if carry else "uses"
    more = {None: ("", ""), "up": (", $13::text[], $14::bigint[]", ", feature, quantity")}.get(
        rated, (", $13::text[], $14::bigint[]", ", feature, units")
    )
    returned = f"{taken_uses('a.', head)} AS uses" if carry else "i.uses"
    rated_returned = ", i.feature, i.quantity" if rated else ""
    columns = _RATED_COLUMNS if rated else ""
    return f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                         $6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::timestamptz[], $12::text[]{more[0]})
        AS i(oauth_provider, external_id, {first}, idempotency_key, charge_id, amount_minor,
             currency, description, metadata, request_fingerprint, created_at, api_key_id{more[1]})
), locked AS MATERIALIZED (
    -- One global lock order: the batch's account rows are locked by id, ascending, before any
    -- is updated (LockRows runs above the Sort, so rows are locked in the order they are sorted),
    -- so two overlapping batches wait for each other instead of deadlocking. The UPDATE below
    -- touches only these rows, already locked by this statement.
    SELECT a.id AS account_id, i.*
    FROM accounts a
    JOIN input i ON a.oauth_provider = i.oauth_provider AND a.external_id = i.external_id
    ORDER BY a.id
    FOR UPDATE OF a
), spent AS (
    UPDATE accounts a SET
        {take},
        {kept if carry else ""}total_uses = a.total_uses + {uses},
        {next_sequence("a.", uses)},
        updated_at = i.created_at
    FROM locked i
    WHERE a.id = i.account_id
      AND a.status = 'active' AND a.currency = i.currency
      AND {enough}
      {_period("a.", "i.created_at", monthly)}
      AND (i.idempotency_key IS NULL
           OR NOT EXISTS (SELECT 1 FROM idempotency_keys k
                          WHERE k.api_key_id IN (i.api_key_id, '') AND k.key = i.idempotency_key))
    RETURNING a.id, a.free_uses_remaining, a.paid_uses_remaining, a.total_uses,
              a.last_charge_free_uses, a.plan_name, i.oauth_provider, i.external_id, {returned},
              a.event_sequence, {THRESHOLD_SQL} AS low_threshold, i.idempotency_key,
              i.charge_id, i.amount_minor, i.currency, i.description, i.metadata,
              i.request_fingerprint, i.created_at, i.api_key_id, {touched_lots("a.")},
              {usable_columns("a.", "i.created_at")}{rated_returned},
              {next_check_columns("a.")}
), recorded AS (
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                         currency, description, metadata, api_key_id, idempotency_key,
                         request_fingerprint, free_uses_after, paid_uses_after,
                         total_uses_after, lot_ids, lot_uses, {columns}created_at)
    SELECT charge_id, id, uses, last_charge_free_uses, uses - last_charge_free_uses,
           amount_minor, currency, description, metadata::json, api_key_id, idempotency_key,
           request_fingerprint, usable_free, usable_other, total_uses, lot_ids, lot_uses,
           {_rated_values(rated, batch=True)}created_at
    FROM spent
), {alerted("spent", "id")}
SELECT charge_id, id, usable_free AS free_uses_remaining, usable_other AS paid_uses_remaining,
       total_uses, last_charge_free_uses, plan_name, lot_ids, lot_uses{", uses" if rated else ""},
       {NEXT_CHECK}
FROM spent
"""  # noqa: S608 (our own constants, no input)


# A hold. $1 provider, $2 external id, $3 uses, $4 reservation id, $5 API key id, $6 metadata
# (JSON text), $7 now, $8 expires_at, $9 idempotency key (or NULL), $10 the request's
# fingerprint. The walk keeps how many of the held uses were free in last_charge_free_uses
# (as it keeps a charge's split) and the lots in last_lot_uses, for the reservation row.
def hold_sql(monthly: bool = False, head: bool = False) -> str:
    uses, at = "$3::bigint", "$7::timestamptz"
    take = (
        head_assignment("a.", uses, hold=True)
        if head
        else walk_assignment("a.", uses, at, hold=True)
    )
    enough = head_covers("a.", uses, at) if head else can_take("a.", uses, at)
    return f"""
WITH held AS (
    UPDATE accounts a SET
        {take},
        -- A hold takes available uses: balance events as a charge's (crossings.py).
        {next_sequence("a.", uses)},
        updated_at = {at}
    WHERE a.oauth_provider = $1::text AND a.external_id = $2::text AND a.status = 'active'
      AND {enough}
      {_period("a.", at, monthly)}
      AND {key_unused("$9::text", "$5::text")}
    RETURNING a.id AS account_id, a.free_uses_remaining, a.paid_uses_remaining,
              a.reserved_free_uses, a.reserved_paid_uses, a.total_uses,
              a.last_charge_free_uses, {crossing_columns("a.")}, {touched_lots("a.")},
              {usable_columns("a.", at)}, {uses} AS uses, {at} AS created_at
), claimed AS (
    {claim("held", "$5::text", "$9::text", "$10::text", at)}
), made AS (
    INSERT INTO reservations (id, account_id, api_key_id, status, uses, free_uses_held,
                              paid_uses_held, expires_at, metadata, idempotency_key,
                              lot_ids, lot_kinds, lot_uses, created_at, updated_at)
    SELECT $4::text, account_id, $5::text, 'held', {uses}, last_charge_free_uses,
           {uses} - last_charge_free_uses, $8::timestamptz, $6::json, $9::text,
           lot_ids, lot_kinds, lot_uses, {at}, {at}
    FROM held
), {alerted("held", "account_id")}
SELECT $4::text AS reservation_id, account_id, usable_free AS free_uses_remaining,
       usable_other AS paid_uses_remaining, reserved_free_uses, reserved_paid_uses, total_uses,
       last_charge_free_uses
FROM held
"""  # noqa: S608 (our own constants, no input)


# The same for many holds: each parameter an array, one element per hold, in the same order.
def hold_batch_sql(monthly: bool = False, head: bool = False) -> str:
    uses, at = "i.uses", "i.at"
    take = (
        head_assignment("a.", uses, hold=True)
        if head
        else walk_assignment("a.", uses, at, hold=True)
    )
    enough = head_covers("a.", uses, at) if head else can_take("a.", uses, at)
    return f"""
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
        {take},
        {next_sequence("a.", "i.uses")},
        updated_at = i.at
    FROM locked i
    WHERE a.id = i.locked_id AND a.status = 'active'
      AND {enough}
      {_period("a.", "i.at", monthly)}
      AND {key_unused("i.idempotency_key", "i.api_key_id")}
    RETURNING a.id AS account_id, a.free_uses_remaining, a.paid_uses_remaining,
              a.reserved_free_uses, a.reserved_paid_uses, a.total_uses,
              a.last_charge_free_uses, i.reservation_id, i.uses, i.api_key_id, i.metadata, i.at,
              i.expires_at, i.idempotency_key, i.fingerprint, {crossing_columns("a.")},
              {touched_lots("a.")}, {usable_columns("a.", "i.at")}, i.at AS created_at
), claimed AS (
    {claim("held", "api_key_id", "idempotency_key", "fingerprint", "at")}
), made AS (
    INSERT INTO reservations (id, account_id, api_key_id, status, uses, free_uses_held,
                              paid_uses_held, expires_at, metadata, idempotency_key,
                              lot_ids, lot_kinds, lot_uses, created_at, updated_at)
    SELECT reservation_id, account_id, api_key_id, 'held', uses, last_charge_free_uses,
           uses - last_charge_free_uses, expires_at, metadata::json, idempotency_key,
           lot_ids, lot_kinds, lot_uses, at, at
    FROM held
), {alerted("held", "account_id")}
SELECT reservation_id, account_id, usable_free AS free_uses_remaining,
       usable_other AS paid_uses_remaining, reserved_free_uses, reserved_paid_uses, total_uses,
       last_charge_free_uses
FROM held
"""  # noqa: S608 (our own constants, no input)


CHARGE_SQL = charge_sql()
CHARGE_BATCH_SQL = charge_batch_sql()
CHARGE_HEAD_SQL = charge_sql(head=True)
CHARGE_HEAD_BATCH_SQL = charge_batch_sql(head=True)
HOLD_SQL = hold_sql()
HOLD_BATCH_SQL = hold_batch_sql()
HOLD_HEAD_SQL = hold_sql(head=True)
HOLD_HEAD_BATCH_SQL = hold_batch_sql(head=True)
