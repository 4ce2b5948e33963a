"""The balance events of the hot statements (charges: writer.py; holds: holds.py), in SQL.

A statement that takes available uses (free + paid) from an account detects, on the row it
locked and updated, whether it crossed the account's balance.low threshold (available before
= available after + uses; crossing iff before >= threshold > after) or emptied it (after = 0):
the UPDATE takes the account's next event sequence number(s) (`next_sequence`), RETURNING
gives what the events need (`crossing_columns`), and one more CTE (`alerted`) inserts the
outbox rows only when it crossed. Exactly once per crossing by construction, however many
statements race; nothing is inserted (and no round trip added) when nothing is crossed. The
data has the keys of events.outbox.record_event + balance_data, in the same order.
"""

from __future__ import annotations

from ciris_billing.events.outbox import BALANCE_DEPLETED, BALANCE_LOW, THRESHOLD_SQL


def next_sequence(row: str, uses: str) -> str:
    """The UPDATE's SET of event_sequence (`row`: the accounts alias and a dot, or ''): one
    more per balance event crossed (SET sees the counters before the change). A statement
    that takes no use (a `carry` charge completing none, ledger/carry.py) crosses nothing."""
    available = f"{row}free_uses_remaining + {row}paid_uses_remaining"
    return (
        f"event_sequence = {row}event_sequence"
        f" + CASE WHEN {available} >= {THRESHOLD_SQL} AND {available} - {uses} < {THRESHOLD_SQL}"
        f" THEN 1 ELSE 0 END"
        f" + CASE WHEN {available} = {uses} AND {uses} > 0 THEN 1 ELSE 0 END"
    )


def crossing_columns(row: str) -> str:
    """RETURNING's columns for `alerted` that a statement does not return already (after the
    change; the threshold as the UPDATE compared it)."""
    return (
        f"{row}oauth_provider, {row}external_id, {row}event_sequence, "
        f"{THRESHOLD_SQL} AS low_threshold"
    )


def alerted(source: str, account_id: str) -> str:
    """The CTE inserting the crossings' outbox rows, from `source`: a CTE with the account's id
    (column `account_id`), the counters after the change, `uses`, `created_at` and
    crossing_columns. balance.low takes the earlier sequence number when the same change also
    emptied the account; a change of 0 uses (a `carry` remainder kept) crosses nothing."""
    available = "s.free_uses_remaining + s.paid_uses_remaining"
    return f"""
alerted AS (
    INSERT INTO events (id, account_id, sequence, type, data, created_at)
    SELECT 'evt_' || replace(gen_random_uuid()::text, '-', ''), s.{account_id},
           s.event_sequence - c.back, c.type,
           json_build_object(
               'account_id', s.{account_id}, 'oauth_provider', s.oauth_provider,
               'external_id', s.external_id, 'sequence', s.event_sequence - c.back,
               'available_uses', {available},
               'free_uses_remaining', s.free_uses_remaining,
               'paid_uses_remaining', s.paid_uses_remaining, 'threshold_uses', s.low_threshold),
           s.created_at
    FROM {source} s
    CROSS JOIN LATERAL (
        SELECT '{BALANCE_LOW}' AS type, CASE WHEN {available} = 0 THEN 1 ELSE 0 END AS back
        WHERE {available} + s.uses >= s.low_threshold AND {available} < s.low_threshold
        UNION ALL
        SELECT '{BALANCE_DEPLETED}', 0 WHERE {available} = 0 AND s.uses > 0
    ) c
)"""  # noqa: S608 (our own constants, no input)
