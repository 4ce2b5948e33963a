"""The console's view of outgoing webhooks (events/): endpoints, their failing deliveries, and
the two actions on them (disable/enable an endpoint, resend a delivery), each through the
events service (events/endpoints.py, as the API and the CLI) with its audit-trail row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, func, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.audit_trail import Entry
from ciris_billing.db import events, webhook_deliveries, webhook_endpoints
from ciris_billing.events import actions, endpoints


@dataclass(frozen=True, slots=True)
class EndpointView:
    endpoint: Row[Any]
    troubled: list[Row[Any]]  # its failed and still-retrying deliveries, newest first


async def failing(conn: AsyncConnection) -> tuple[int, int]:
    """(deliveries being retried, endpoints failing or disabled): the overview's figures. The
    retrying ones through the partial index on pending deliveries; endpoints are few."""
    retrying = await conn.scalar(
        select(func.count())
        .select_from(webhook_deliveries)
        .where(webhook_deliveries.c.status == "pending", webhook_deliveries.c.attempts > 0)
    )
    troubled = await conn.scalar(
        select(func.count())
        .select_from(webhook_endpoints)
        .where(
            or_(
                webhook_endpoints.c.status == "disabled",
                webhook_endpoints.c.failing_since.is_not(None),
            )
        )
    )
    return int(retrying or 0), int(troubled or 0)


async def overview(conn: AsyncConnection, per_endpoint: int = 20) -> list[EndpointView]:
    views = []
    for endpoint in await endpoints.list_endpoints(conn):
        troubled = list(
            await conn.execute(
                select(webhook_deliveries, events.c.type)
                .join(events, events.c.id == webhook_deliveries.c.event_id)
                .where(
                    webhook_deliveries.c.endpoint_id == endpoint.id,
                    or_(
                        webhook_deliveries.c.status == "failed",
                        (webhook_deliveries.c.status == "pending")
                        & (webhook_deliveries.c.attempts > 0),
                    ),
                )
                .order_by(webhook_deliveries.c.created_at.desc(), webhook_deliveries.c.id.desc())
                .limit(per_endpoint)
            )
        )
        views.append(EndpointView(endpoint, troubled))
    return views


# Disable, enable and resend with their audit entries: the same for every door (events/actions.py).
set_enabled = actions.set_enabled


async def resend(conn: AsyncConnection, endpoint_id: str, delivery_id: str) -> Entry:
    entry, _row = await actions.resend(conn, endpoint_id, delivery_id)
    return entry
