"""The capture statements (alone and batched): a hold's uses spent from the lots it took.

A capture is ONE statement: the conditional UPDATE of the reservation `WHERE status = 'held'
AND expires_at > now` makes the transition exactly once (of racing captures, releases and
expiries only one finds it 'held'); then, on the account row locked after it:
- the captured uses are taken from the hold's lots in the hold's order with NO expiry check (a
  hold is a promise: a lot that expired since is still spent): `ledger_walk(r.lot_uses,
  r.lot_kinds, NULL, c, at)`; the charge row records what it took from each lot;
- the paid uses coming back pay off owed uses first (reservations.owed_after: what a refund or
  a lost dispute could not take because it was held), taken from the hold's non-free lots in
  its order; the `owed_taken` ledger row names them (lot_uses negative);
- the rest goes back into the wallet, each use to the lot it came from (`ledger_give_back`),
  with the counters (and the reserved ones) by kind.
Lock order: the reservation's row, then the account's (as every other transition).
"""

from __future__ import annotations

from ciris_billing.ledger.statements import claim, key_unused, usable_columns


def _settled_and_spent(claimed: str, extra: str) -> str:
    """The CTEs after `won` (the reservation captured: its row, the capture's inputs), shared
    by the statement alone and batched: lock the account, walk the hold's lots, pay off owed
    uses, give the rest back, write the charge (and owed_taken) rows and claim the key."""
    # Slot by slot (ledger_slotwise): the paid uses coming back; what comes back once owed
    # uses were paid off from them.
    paid_back = "ledger_slotwise(s.back, s.lot_kinds::bigint[], true)"
    given = "ledger_slotwise(o.back, o.owed_took, false)"
    return f"""
, locked AS MATERIALIZED (
    -- The account's row, locked after the reservation's (the one lock order of holds), by id
    -- ascending across a batch; read under the lock: the owed uses to pay off.
    SELECT w.*, a.refund_owed_uses AS owed
    FROM accounts a JOIN won w ON a.id = w.account_id
    ORDER BY a.id
    FOR UPDATE OF a
), settled AS (
    -- The captured uses from the hold's lots, in its order, no expiry check (a promise); what
    -- is left of each comes back. reservations.owed_after: the paid uses coming back pay off
    -- owed uses first.
    SELECT l.*, c.taken AS took, c.new_left AS back, c.free_taken AS free_used,
           c.other_taken AS paid_used,
           LEAST(l.owed, l.paid_uses_held - c.other_taken) AS paid_off
    FROM locked l
    CROSS JOIN LATERAL ledger_walk(l.lot_uses, l.lot_kinds, NULL::timestamptz[],
                                   l.captured_uses, l.at) c
), owing AS (
    -- The owed uses paid off from the non-free lots coming back, in the hold's order.
    SELECT s.*, p.taken AS owed_took
    FROM settled s
    CROSS JOIN LATERAL ledger_walk(
        CASE WHEN s.paid_off = 0 THEN s.back ELSE {paid_back} END,
        s.lot_kinds, NULL::timestamptz[], s.paid_off, s.at) p
), settling AS (
    SELECT o.*, CASE WHEN o.paid_off = 0 THEN o.back ELSE {given} END AS given
    FROM owing o
), spent AS (
    UPDATE accounts a SET
        lot_left = ledger_give_back(a.lot_ids, a.lot_left, s.lot_ids, s.given),
        reserved_free_uses = a.reserved_free_uses - s.free_uses_held,
        reserved_paid_uses = a.reserved_paid_uses - s.paid_uses_held,
        free_uses_remaining = a.free_uses_remaining + s.free_uses_held - s.free_used,
        paid_uses_remaining =
            a.paid_uses_remaining + s.paid_uses_held - s.paid_used - s.paid_off,
        -- No more stays owed than is still held: a captured hold's uses were spent.
        refund_owed_uses = LEAST(s.owed - s.paid_off, a.reserved_paid_uses - s.paid_uses_held),
        total_uses = a.total_uses + s.captured_uses,
        updated_at = s.at
    FROM settling s
    WHERE a.id = s.account_id
    RETURNING a.id AS account_id, a.oauth_provider, a.external_id, a.currency, a.plan_name,
              a.free_uses_remaining, a.paid_uses_remaining, a.reserved_free_uses,
              a.reserved_paid_uses, a.total_uses, s.reservation_id, s.uses AS held_uses_of,
              s.captured_uses, s.free_used, s.paid_used, s.paid_off, s.charge_id, s.credit_id,
              s.amount_minor, s.description, s.metadata AS held_metadata, s.extra, s.api_key_id,
              s.at, ledger_touched(s.lot_ids, s.took) AS lot_ids,
              array_remove(s.took, 0::bigint) AS lot_uses,
              ledger_touched(s.lot_ids, s.owed_took) AS owed_lot_ids,
              CASE WHEN s.paid_off = 0 THEN '{{}}'::bigint[] ELSE ledger_slotwise(
                  array_fill(0::bigint, ARRAY[cardinality(
                      array_remove(s.owed_took, 0::bigint))]),
                  array_remove(s.owed_took, 0::bigint), false) END AS owed_lot_uses,
              {usable_columns("a.", "s.at")}{extra}
), recorded AS (
    INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, amount_minor,
                         currency, description, metadata, api_key_id, reservation_id,
                         free_uses_after, paid_uses_after, total_uses_after, lot_ids, lot_uses,
                         created_at)
    SELECT charge_id, account_id, captured_uses, free_used, paid_used, amount_minor, currency,
           description, (held_metadata::jsonb || extra::jsonb)::json, api_key_id,
           reservation_id, usable_free, usable_other, total_uses, lot_ids, lot_uses, at
    FROM spent
), repaid AS (
    INSERT INTO credits (id, account_id, kind, free_uses_delta, paid_uses_delta,
                         held_uses_delta, shortfall_uses, amount_minor, currency, description,
                         lot_ids, lot_uses, created_at)
    SELECT credit_id, account_id, 'owed_taken', 0, -paid_off, 0, 0, 0, currency,
           paid_off || ' paid uses owed to a refund or a lost dispute, taken when held uses '
           || 'came back (' || reservation_id || ')', owed_lot_ids, owed_lot_uses, at
    FROM spent WHERE paid_off > 0
), claimed AS (
    {claimed}
)
SELECT reservation_id, account_id, oauth_provider, external_id, currency, plan_name,
       usable_free AS free_uses_remaining, usable_other AS paid_uses_remaining,
       reserved_free_uses, reserved_paid_uses,
       total_uses, held_uses_of, captured_uses, free_used, paid_used, charge_id,
       held_metadata::text AS held_metadata, lot_ids, lot_uses
FROM spent
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
      -- A `carry` hold is captured by quantity on the framework's path (reservations.py).
      AND r.units_per_use IS NULL
      AND {key_unused("$10::text", "$8::text")}
    RETURNING r.id AS reservation_id, r.account_id, r.uses, r.captured_uses,
              r.free_uses_held, r.paid_uses_held, r.metadata, r.lot_ids, r.lot_kinds,
              r.lot_uses, $3::text AS charge_id, $9::text AS credit_id,
              $5::bigint AS amount_minor, $6::text AS description, $7::text AS extra,
              $8::text AS api_key_id, $4::timestamptz AS at
){_settled_and_spent(claim("spent", "$8::text", "$10::text", "$11::text", "$4::timestamptz"), "")}"""  # noqa: E501, S608

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
      AND r.units_per_use IS NULL  -- as CAPTURE_SQL: a `carry` hold too
      AND {key_unused("i.idempotency_key", "i.api_key_id")}
    RETURNING r.id AS reservation_id, r.account_id, r.uses, r.captured_uses,
              r.free_uses_held, r.paid_uses_held, r.metadata, r.lot_ids, r.lot_kinds,
              r.lot_uses, i.charge_id, i.credit_id, i.amount_minor, i.description, i.extra,
              i.api_key_id, i.at, i.idempotency_key, i.fingerprint
){_settled_and_spent(claim("spent", "api_key_id", "idempotency_key", "fingerprint", "at"), ", s.idempotency_key, s.fingerprint")}"""  # noqa: E501, S608
