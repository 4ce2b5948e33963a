"""The ledger's and the lots' movements as CSV, streamed (issue 25 item 3).

Rows come from a server-side cursor (`AsyncConnection.stream`) in pages of PAGE rows and leave
as CSV text page by page, so memory stays flat whatever the number of rows (1M rows: the
process holds one page at a time). The sort is PostgreSQL's (spilling to disk if it must),
never ours. Ids, kinds, numbers and times only: no free text, no personal data.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

Export = Literal["ledger", "lots"]

PAGE = 2_000

LEDGER_FIELDS = (
    "created_at",
    "entry",
    "id",
    "account_id",
    "kind",
    "free_uses_delta",
    "paid_uses_delta",
    "held_uses_delta",
    "shortfall_uses",
    "amount_minor",
    "currency",
    "external_transaction_id",
)

LEDGER = """
SELECT * FROM (
    SELECT created_at, 'charge' AS entry, id, account_id, 'charge' AS kind,
           -free_uses_used AS free_uses_delta, -paid_uses_used AS paid_uses_delta,
           0 AS held_uses_delta, 0 AS shortfall_uses, amount_minor, currency,
           NULL AS external_transaction_id
    FROM charges
    WHERE created_at >= :start AND created_at < :end
      AND (CAST(:account_id AS varchar) IS NULL OR account_id = :account_id)
    UNION ALL
    SELECT created_at, 'credit', id, account_id, kind, free_uses_delta, paid_uses_delta,
           held_uses_delta, shortfall_uses, amount_minor, currency, external_transaction_id
    FROM credits
    WHERE created_at >= :start AND created_at < :end
      AND (CAST(:account_id AS varchar) IS NULL OR account_id = :account_id)
) AS rows
ORDER BY created_at, id
"""

LOT_FIELDS = (
    "created_at",
    "entry",
    "id",
    "kind",
    "account_id",
    "lot_id",
    "lot_kind",
    "uses_delta",
    "cost_basis_minor",
    "currency",
)

LOTS = """
SELECT m.created_at, m.entry, m.id, m.kind, m.account_id, m.lot_id, l.kind AS lot_kind,
       m.uses_delta, l.cost_basis_minor, l.currency
FROM (
    SELECT ch.created_at, 'charge' AS entry, ch.id, 'charge' AS kind, ch.account_id,
           x.lot_id, -x.n AS uses_delta
    FROM charges ch, unnest(ch.lot_ids, ch.lot_uses) AS x(lot_id, n)
    WHERE ch.lot_ids IS NOT NULL AND ch.created_at >= :start AND ch.created_at < :end
      AND (CAST(:account_id AS varchar) IS NULL OR ch.account_id = :account_id)
    UNION ALL
    SELECT c.created_at, 'credit', c.id, c.kind, c.account_id, x.lot_id, x.n
    FROM credits c, unnest(c.lot_ids, c.lot_uses) AS x(lot_id, n)
    WHERE c.lot_ids IS NOT NULL AND c.created_at >= :start AND c.created_at < :end
      AND (CAST(:account_id AS varchar) IS NULL OR c.account_id = :account_id)
    UNION ALL
    SELECT created_at, 'lot', id, 'granted', account_id, id, uses_granted
    FROM lots
    WHERE created_at >= :start AND created_at < :end
      AND (CAST(:account_id AS varchar) IS NULL OR account_id = :account_id)
) AS m JOIN lots l ON l.id = m.lot_id
ORDER BY m.created_at, m.id, m.lot_id
"""

QUERIES: dict[Export, tuple[Sequence[str], str]] = {
    "ledger": (LEDGER_FIELDS, LEDGER),
    "lots": (LOT_FIELDS, LOTS),
}


def _cell(value: object) -> object:
    return value.isoformat() if isinstance(value, datetime) else value


def _lines(rows: Sequence[Sequence[object]]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([[_cell(v) for v in row] for row in rows])
    return out.getvalue()


async def stream_csv(
    engine: AsyncEngine,
    export: Export,
    start: datetime,
    end: datetime,
    account_id: str | None = None,
) -> AsyncIterator[str]:
    """The export's CSV, header first, a page of rows at a time (reads only)."""
    fields, query = QUERIES[export]
    yield _lines([fields])
    params = {"start": start, "end": end, "account_id": account_id}
    # Its own connection: a streamed response outlives the request's unit of work. One
    # REPEATABLE READ snapshot, so a long export is one consistent picture of the ledger.
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="REPEATABLE READ", yield_per=PAGE)
        result = await conn.stream(text(query), params)
        async for page in result.partitions(PAGE):
            yield _lines(page)
