"""The per-lot invariant, checked (issue 23; audit.py runs it with the account-level checks).

For every lot: what it has left now (its wallet slot's `lot_left` while in the wallet, else
0) = `uses_granted` + its credits rows' signed `lot_uses` - its charges' `lot_uses` - what
open ('held') reservations hold of it; and 0 <= left <= uses_granted. An account's wallet is
exactly its 'active' lots (a lot leaves it only closed: used, expired, voided, erased), each
slot with its lot's kind. Counters are the wallet's sums by kind (free_uses_remaining: free
lots; paid_uses_remaining: promotional and paid lots); reserved counters are the sums of the
open holds' `lot_uses` by kind, and each open hold's `lot_uses` add up to its uses. The
wallet is in the consumption order (priority, soonest expiry, kind, oldest, id).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


@dataclass(frozen=True, slots=True)
class LotFinding:
    account_id: str
    lot_id: str | None  # the lot, or the reservation (hold_lots_mismatch), or None
    # lot_left_mismatch (left != granted + movements), lot_out_of_bounds (left < 0 or above
    # its grant), active_lot_not_in_wallet, closed_lot_in_wallet, unknown_lot_in_wallet,
    # wallet_kind_mismatch, counters_not_wallet (free/paid counters vs the wallet's sums),
    # reserved_not_holds (reserved counters vs open holds' lot_uses), hold_lots_mismatch (an
    # open hold's lot_uses do not add up to its held uses), wallet_out_of_order (the wallet is
    # not in the consumption order, ledger/rules.py)
    problem: str


_LOTS = """
WITH moved AS (
    SELECT u.lot_id, sum(u.uses) AS uses
    FROM credits c, unnest(c.lot_ids, c.lot_uses) AS u(lot_id, uses)
    WHERE c.lot_ids IS NOT NULL GROUP BY u.lot_id
), spent AS (
    SELECT u.lot_id, sum(u.uses) AS uses
    FROM charges ch, unnest(ch.lot_ids, ch.lot_uses) AS u(lot_id, uses)
    WHERE ch.lot_ids IS NOT NULL GROUP BY u.lot_id
), held AS (
    SELECT u.lot_id, sum(u.uses) AS uses
    FROM reservations r, unnest(r.lot_ids, r.lot_uses) AS u(lot_id, uses)
    WHERE r.status = 'held' AND r.lot_ids IS NOT NULL GROUP BY u.lot_id
), wallet AS (
    SELECT a.id AS account_id, w.lot_id, w.left_now, w.kind
    FROM accounts a, unnest(a.lot_ids, a.lot_left, a.lot_kinds) AS w(lot_id, left_now, kind)
), checked AS (
    SELECT l.id, l.account_id, l.status, l.uses_granted,
           coalesce(w.left_now, 0) AS left_now,
           l.uses_granted + coalesce(m.uses, 0) - coalesce(s.uses, 0) - coalesce(h.uses, 0)
               AS expected,
           w.lot_id IS NOT NULL AND w.account_id = l.account_id AS in_wallet,
           w.kind IS NOT NULL AND w.kind <> CASE l.kind WHEN 'free' THEN 0
               WHEN 'promotional' THEN 1 ELSE 2 END AS wrong_kind
    FROM lots l
    LEFT JOIN moved m ON m.lot_id = l.id
    LEFT JOIN spent s ON s.lot_id = l.id
    LEFT JOIN held h ON h.lot_id = l.id
    LEFT JOIN wallet w ON w.lot_id = l.id
)
SELECT c.account_id, c.id, p.problem
FROM checked c, LATERAL (VALUES
    ('lot_left_mismatch', c.left_now <> c.expected),
    ('lot_out_of_bounds', c.left_now < 0 OR c.left_now > c.uses_granted),
    ('active_lot_not_in_wallet', c.status = 'active' AND NOT c.in_wallet),
    ('closed_lot_in_wallet', c.status <> 'active' AND c.in_wallet),
    ('wallet_kind_mismatch', c.wrong_kind)
) AS p(problem, found)
WHERE p.found
UNION ALL
SELECT a.id, w.lot_id, 'unknown_lot_in_wallet'
FROM accounts a, unnest(a.lot_ids) AS w(lot_id)
WHERE NOT EXISTS (SELECT 1 FROM lots l WHERE l.id = w.lot_id AND l.account_id = a.id)
ORDER BY 1, 2
"""

_COUNTERS = """
WITH holds AS (
    SELECT r.account_id,
           coalesce(sum(x.uses) FILTER (WHERE x.kind = 0), 0) AS free,
           coalesce(sum(x.uses) FILTER (WHERE x.kind <> 0), 0) AS paid
    FROM reservations r, unnest(r.lot_uses, r.lot_kinds) AS x(uses, kind)
    WHERE r.status = 'held' GROUP BY r.account_id
)
SELECT a.id, NULL AS lot_id, 'counters_not_wallet' AS problem
FROM accounts a
WHERE a.free_uses_remaining <> (SELECT coalesce(sum(x.left_now), 0)
                                FROM unnest(a.lot_left, a.lot_kinds) AS x(left_now, kind)
                                WHERE x.kind = 0)
   OR a.paid_uses_remaining <> (SELECT coalesce(sum(x.left_now), 0)
                                FROM unnest(a.lot_left, a.lot_kinds) AS x(left_now, kind)
                                WHERE x.kind <> 0)
UNION ALL
SELECT a.id, NULL, 'reserved_not_holds'
FROM accounts a LEFT JOIN holds h ON h.account_id = a.id
WHERE a.reserved_free_uses <> coalesce(h.free, 0) OR a.reserved_paid_uses <> coalesce(h.paid, 0)
UNION ALL
SELECT a.id, NULL, 'wallet_out_of_order'
FROM accounts a
WHERE cardinality(a.lot_ids) > 1 AND a.lot_ids <> ARRAY(
    SELECT l.id FROM lots l WHERE l.id = ANY (a.lot_ids)
    ORDER BY l.priority, l.expires_at IS NULL, l.expires_at,
             CASE l.kind WHEN 'free' THEN 0 WHEN 'promotional' THEN 1 ELSE 2 END,
             l.created_at, l.id COLLATE "C")
UNION ALL
SELECT r.account_id, r.id, 'hold_lots_mismatch'
FROM reservations r
WHERE r.status = 'held'
  AND coalesce((SELECT sum(u) FROM unnest(r.lot_uses) AS u), 0) <> r.uses
ORDER BY 1, 2
"""


async def lot_findings(conn: AsyncConnection) -> list[LotFinding]:
    """Every breach of the per-lot invariant and of the wallet's agreement with the counters
    (reads only)."""
    found: list[LotFinding] = []
    for query in (_LOTS, _COUNTERS):
        rows = await conn.execute(text(query))
        found.extend(LotFinding(row[0], row[1], row[2]) for row in rows)
    return found
