"""The `carry` charge that completes no use: the remainder kept, a charge row of 0 uses.

A `carry` charge (ledger/carry.py) whose quantity, added to what the account carried for the
feature, stays below one use takes nothing from the wallet: ONE statement updates the carry
on the locked account row (re-checked by PostgreSQL when a concurrent charge changed it, so
the remainder is exact) and records the charge with 0 uses, its feature and quantity, and no
lot. The charge store sends it first for a quantity below one use (most such charges end
here), then the `carry` charge texts (statements.py), which take the uses when it made no row.
Parameters as statements.charge_sql's `carry` texts ($3 the quantity, $13 the feature, $14
the units per use).
"""

from __future__ import annotations

from ciris_billing.ledger.carry import carry_assignment, carry_total
from ciris_billing.ledger.statements import _period, usable_columns


def carry_zero_sql(monthly: bool = False) -> str:
    at = "$11::timestamptz"
    feature, quantity, units = "$13::text", "$3::bigint", "$14::bigint"
    return f"""
WITH kept AS (
    UPDATE accounts SET
        {carry_assignment("", feature, quantity, units)},
        updated_at = {at}
    WHERE oauth_provider = $1 AND external_id = $2 AND status = 'active' AND currency = $7
      AND {carry_total("", feature, quantity)} < {units}
      {_period("", at, monthly)}
      AND ($4::text IS NULL OR NOT EXISTS (
          SELECT 1 FROM idempotency_keys WHERE api_key_id IN ($12::text, '') AND key = $4))
    RETURNING id, total_uses, plan_name, {usable_columns("", at)}
), recorded AS (
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                         currency, description, metadata, api_key_id, idempotency_key,
                         request_fingerprint, free_uses_after, paid_uses_after,
                         total_uses_after, lot_ids, lot_uses, feature, quantity, created_at)
    SELECT $5, id, 0, 0, 0, $6, $7, $8, $9::json, $12, $4, $10, usable_free, usable_other,
           total_uses, '{{}}', '{{}}', {feature}, {quantity}, {at}
    FROM kept
)
SELECT id, usable_free AS free_uses_remaining, usable_other AS paid_uses_remaining, total_uses,
       0::bigint AS last_charge_free_uses, plan_name, '{{}}'::varchar[] AS lot_ids,
       '{{}}'::bigint[] AS lot_uses, 0::bigint AS uses
FROM kept
"""  # noqa: S608 (our own constants, no input)


def carry_zero_batch_sql(monthly: bool = False) -> str:
    at = "i.created_at"
    feature, quantity, units = "i.feature", "i.quantity", "i.units"
    return f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[],
                         $6::bigint[], $7::text[], $8::text[], $9::text[], $10::text[],
                         $11::timestamptz[], $12::text[], $13::text[], $14::bigint[])
        AS i(oauth_provider, external_id, quantity, idempotency_key, charge_id, amount_minor,
             currency, description, metadata, request_fingerprint, created_at, api_key_id,
             feature, units)
), locked AS MATERIALIZED (
    -- The charges' lock order (statements.charge_batch_sql): the batch's accounts locked by
    -- id, ascending, before any is updated, so overlapping batches wait, never deadlock.
    SELECT a.id AS account_id, i.*
    FROM accounts a
    JOIN input i ON a.oauth_provider = i.oauth_provider AND a.external_id = i.external_id
    ORDER BY a.id
    FOR UPDATE OF a
), kept AS (
    UPDATE accounts a SET
        {carry_assignment("a.", feature, quantity, units)},
        updated_at = i.created_at
    FROM locked i
    WHERE a.id = i.account_id
      AND a.status = 'active' AND a.currency = i.currency
      AND {carry_total("a.", feature, quantity)} < {units}
      {_period("a.", at, monthly)}
      AND (i.idempotency_key IS NULL
           OR NOT EXISTS (SELECT 1 FROM idempotency_keys k
                          WHERE k.api_key_id IN (i.api_key_id, '') AND k.key = i.idempotency_key))
    RETURNING a.id, a.total_uses, a.plan_name, i.*, {usable_columns("a.", at)}
), recorded AS (
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                         currency, description, metadata, api_key_id, idempotency_key,
                         request_fingerprint, free_uses_after, paid_uses_after,
                         total_uses_after, lot_ids, lot_uses, feature, quantity, created_at)
    SELECT charge_id, id, 0, 0, 0, amount_minor, currency, description, metadata::json,
           api_key_id, idempotency_key, request_fingerprint, usable_free, usable_other,
           total_uses, '{{}}', '{{}}', feature, quantity, created_at
    FROM kept
)
SELECT charge_id, id, usable_free AS free_uses_remaining, usable_other AS paid_uses_remaining,
       total_uses, 0::bigint AS last_charge_free_uses, plan_name, '{{}}'::varchar[] AS lot_ids,
       '{{}}'::bigint[] AS lot_uses, 0::bigint AS uses
FROM kept
"""  # noqa: S608 (our own constants, no input)
