"""The one credit reader: one statement per check, and checks that queue up read together in one
statement (lanes.py). A read changes nothing, so a batch is simply the same SELECT for many
identities; each check gets its own account's row (or None).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from ciris_billing.accounts.hot.lanes import Lanes, Waiting
from ciris_billing.accounts.hot.pool import StatementPool
from ciris_billing.accounts.service import Identity


def _wallet(row: str) -> str:
    """The wallet's columns, read only when something in it expires (next_expiry_at set): then
    what is usable at the check's time and the next expiry are computed from them in Python
    (ledger/balance.py); otherwise the counters say it, and the columns are NULL (no bytes)."""
    return ", ".join(
        f"CASE WHEN {row}next_expiry_at IS NULL THEN NULL ELSE {row}{column} END AS {column}"
        for column in ("lot_left", "lot_kinds", "lot_expires")
    )


# $1 provider, $2 external id.
CHECK_SQL = f"""
SELECT status, status_reason, plan_name, free_uses_remaining, paid_uses_remaining, total_uses,
       reserved_free_uses, reserved_paid_uses, next_expiry_at, free_period, {_wallet("")}
FROM accounts WHERE oauth_provider = $1 AND external_id = $2
"""  # noqa: S608 (our own constants)

# The same for many identities: $1 and $2 are arrays, one element per check.
BATCH_SQL = f"""
SELECT i.oauth_provider, i.external_id, a.status, a.status_reason, a.plan_name,
       a.free_uses_remaining, a.paid_uses_remaining, a.total_uses,
       a.reserved_free_uses, a.reserved_paid_uses, a.next_expiry_at, a.free_period,
       {_wallet("a.")}
FROM unnest($1::text[], $2::text[]) AS i(oauth_provider, external_id)
JOIN accounts a ON a.oauth_provider = i.oauth_provider AND a.external_id = i.external_id
"""  # noqa: S608 (our own constants)


class AccountReader(Lanes[Identity]):
    """Reads the accounts credit checks ask about, batching the reads that wait."""

    def __init__(self, statements: StatementPool, lanes: int) -> None:
        super().__init__("check", lanes)
        self._statements = statements

    async def read(self, identity: Identity) -> Any:
        """The account's status, plan and counters (a record), or None when there is no such
        account."""
        return await self.submit(identity, identity)

    async def _send_one(self, waiting: Waiting[Identity]) -> None:
        identity = waiting.request
        row = await self._statements.fetch_one(
            CHECK_SQL, (identity.oauth_provider, identity.external_id), read=True
        )
        waiting.settle(row)

    async def _send_many(self, batch: list[Waiting[Identity]]) -> None:
        providers = [w.request.oauth_provider for w in batch]
        external_ids = [w.request.external_id for w in batch]
        rows = await self._statements.fetch_all(BATCH_SQL, (providers, external_ids), read=True)
        found: dict[Hashable, Any] = {
            Identity(row["oauth_provider"], row["external_id"]): row for row in rows
        }
        for waiting in batch:
            waiting.settle(found.get(waiting.key))
