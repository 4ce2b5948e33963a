"""A catalog change's audit-trail row, in the change's transaction, whatever the door."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import audit_trail
from ciris_billing.audit_trail import Entry, Operator


async def audit(
    conn: AsyncConnection, operator: Operator, request_id: str | None, entry: Entry
) -> str:
    """The row's id. `request_id`: the console's one-time confirmation id (unique: a second
    submit rolls back whole); None for the API and the CLI (a fresh id)."""
    if request_id is None:
        return await audit_trail.record_action(conn, operator, entry)
    return await audit_trail.record(conn, operator, entry, request_id)
