"""Operator actions on webhook endpoints with the audit-trail entry each writes, the same for
every door (API, CLI, console: audit_trail.py): disable or enable an endpoint, resend a
delivery. The caller writes the entry in the action's transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.audit_trail import Entry
from ciris_billing.db import webhook_deliveries
from ciris_billing.events import endpoints


def _endpoint_state(row: Any) -> dict[str, Any]:
    return {"status": row.status, "disabled_reason": row.disabled_reason}


async def set_enabled(
    conn: AsyncConnection, endpoint_id: str, enabled: bool
) -> tuple[Entry, Row[Any]]:
    """Disable or enable an endpoint (events.endpoints.set_enabled); the audit entry to write."""
    before = await endpoints.get(conn, endpoint_id, lock=True)
    after = await endpoints.set_enabled(conn, endpoint_id, enabled)
    entry = Entry(
        "enable_endpoint" if enabled else "disable_endpoint",
        None,
        endpoint_id,
        {"url": after.url},
        _endpoint_state(before),
        _endpoint_state(after),
    )
    return entry, after


async def resend(
    conn: AsyncConnection, endpoint_id: str, delivery_id: str
) -> tuple[Entry, Row[Any]]:
    """Send a delivery again at the next delivery run (events.endpoints.resend)."""
    before = (
        await conn.execute(
            select(webhook_deliveries).where(
                webhook_deliveries.c.id == delivery_id,
                webhook_deliveries.c.endpoint_id == endpoint_id,
            )
        )
    ).first()
    after = await endpoints.resend(conn, endpoint_id, delivery_id)
    state = {} if before is None else {"status": before.status, "attempts": int(before.attempts)}
    entry = Entry(
        "resend_delivery",
        None,
        delivery_id,
        {"endpoint_id": endpoint_id, "event_id": after.event_id},
        state,
        {"status": after.status, "attempts": int(after.attempts)},
    )
    return entry, after
