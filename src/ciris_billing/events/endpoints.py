"""Webhook endpoints: where events go, their secrets, and their deliveries (the business side of
routes.py and the CLI's `webhook-endpoints` commands).

Functions here take an open connection inside the caller's transaction and never commit. The
URL's DNS check (ssrf.py) is the caller's, before its transaction: no transaction is held
while a name server answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import iso, new_id, utcnow, webhook_deliveries, webhook_endpoints
from ciris_billing.errors import InvalidRequest, WebhookDeliveryNotFound, WebhookEndpointNotFound
from ciris_billing.events import signing
from ciris_billing.events.outbox import EVENT_TYPES

# After a rotation the old secret keeps signing beside the new one this long.
ROTATION_OVERLAP = timedelta(hours=24)


@dataclass(frozen=True, slots=True)
class NewEndpoint:
    url: str
    events: list[str] | None  # None: every event type
    description: str | None = None


def event_filter(requested: Sequence[str] | None) -> list[str] | None:
    """The endpoint's `events` as stored: known types, each once, in our order (None: all)."""
    if requested is None:
        return None
    unknown = sorted(set(requested) - set(EVENT_TYPES))
    if unknown:
        raise InvalidRequest(
            f"events: unknown event types {', '.join(unknown)}; known: {', '.join(EVENT_TYPES)}"
        )
    if not requested:
        raise InvalidRequest("events: name at least one event type, or leave it out for all")
    return [kind for kind in EVENT_TYPES if kind in requested]


async def create(conn: AsyncConnection, new: NewEndpoint) -> tuple[Row[Any], str]:
    """The new endpoint (enabled) and its signing secret (shown once by the caller)."""
    now = utcnow()
    secret = signing.new_secret()
    row = (
        await conn.execute(
            webhook_endpoints.insert()
            .values(
                id=new_id("we"),
                url=new.url,
                description=new.description,
                events=event_filter(new.events),
                secret=secret,
                status="enabled",
                created_at=now,
                updated_at=now,
            )
            .returning(*webhook_endpoints.c)
        )
    ).one()
    return row, secret


async def get(conn: AsyncConnection, endpoint_id: str, *, lock: bool = False) -> Row[Any]:
    query = select(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id)
    row = (await conn.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise WebhookEndpointNotFound(f"No webhook endpoint {endpoint_id}")
    return row


async def list_endpoints(conn: AsyncConnection) -> list[Row[Any]]:
    rows = await conn.execute(
        select(webhook_endpoints).order_by(webhook_endpoints.c.created_at, webhook_endpoints.c.id)
    )
    return list(rows)


async def delete(conn: AsyncConnection, endpoint_id: str) -> None:
    """Remove the endpoint and its deliveries (a delivery job in flight finds nothing)."""
    deleted = await conn.execute(
        webhook_endpoints.delete()
        .where(webhook_endpoints.c.id == endpoint_id)
        .returning(webhook_endpoints.c.id)
    )
    if deleted.first() is None:
        raise WebhookEndpointNotFound(f"No webhook endpoint {endpoint_id}")


async def rotate_secret(conn: AsyncConnection, endpoint_id: str) -> tuple[Row[Any], str]:
    """A new secret; the current one keeps signing beside it for ROTATION_OVERLAP (a second
    rotation within that time retires the oldest at once: two secrets at most)."""
    now = utcnow()
    current = await get(conn, endpoint_id, lock=True)  # rotations of one endpoint in turn
    secret = signing.new_secret()
    row = (
        await conn.execute(
            webhook_endpoints.update()
            .where(webhook_endpoints.c.id == endpoint_id)
            .values(
                secret=secret,
                previous_secret=current.secret,
                previous_secret_expires_at=now + ROTATION_OVERLAP,
                updated_at=now,
            )
            .returning(*webhook_endpoints.c)
        )
    ).one()
    return row, secret


async def set_enabled(conn: AsyncConnection, endpoint_id: str, enabled: bool) -> Row[Any]:
    """Enable (its run of failures forgotten) or disable (by an operator) the endpoint."""
    values: dict[str, Any] = {"status": "enabled" if enabled else "disabled"}
    values.update(
        {"disabled_reason": None, "failing_since": None}
        if enabled
        else {"disabled_reason": "disabled by an operator"}
    )
    row = (
        await conn.execute(
            webhook_endpoints.update()
            .where(webhook_endpoints.c.id == endpoint_id)
            .values(**values, updated_at=utcnow())
            .returning(*webhook_endpoints.c)
        )
    ).first()
    if row is None:
        raise WebhookEndpointNotFound(f"No webhook endpoint {endpoint_id}")
    return row


def secrets_in_force(endpoint: Any, now: datetime) -> list[str]:
    """The secrets that sign a delivery now: the current one, and the previous one during its
    overlap."""
    found = [endpoint.secret]
    expires = endpoint.previous_secret_expires_at
    if endpoint.previous_secret and expires is not None and expires > now:
        found.append(endpoint.previous_secret)
    return found


async def deliveries(
    conn: AsyncConnection,
    endpoint_id: str,
    status: str | None,
    *,
    limit: int,
    offset: int,
) -> list[Row[Any]]:
    """The endpoint's deliveries, newest first (404 for an unknown endpoint)."""
    await get(conn, endpoint_id)
    query = select(webhook_deliveries).where(webhook_deliveries.c.endpoint_id == endpoint_id)
    if status is not None:
        query = query.where(webhook_deliveries.c.status == status)
    rows = await conn.execute(
        query.order_by(webhook_deliveries.c.created_at.desc(), webhook_deliveries.c.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(rows)


async def resend(conn: AsyncConnection, endpoint_id: str, delivery_id: str) -> Row[Any]:
    """Send the delivery again as soon as the delivery job runs (pending, due now), whatever
    became of it; the same event, so the same webhook-id. Its attempts keep counting, and so
    does its retry window: a resend of a delivery older than 3 days is one more attempt."""
    now = utcnow()
    # Safe beside a delivery job: the job records an attempt only on a row still pending with
    # the attempts it read (delivery.py), so a resend is never lost nor counted twice.
    row = (
        await conn.execute(
            webhook_deliveries.update()
            .where(
                webhook_deliveries.c.id == delivery_id,
                webhook_deliveries.c.endpoint_id == endpoint_id,
            )
            .values(status="pending", next_attempt_at=now)
            .returning(*webhook_deliveries.c)
        )
    ).first()
    if row is None:
        raise WebhookDeliveryNotFound(f"No delivery {delivery_id} of endpoint {endpoint_id}")
    return row


def endpoint_body(row: Any, secret: str | None = None) -> dict[str, Any]:
    """An endpoint as the API shows it (the secret only when just made)."""
    body: dict[str, Any] = {
        "id": row.id,
        "url": row.url,
        "events": row.events,
        "description": row.description,
        "status": row.status,
        "disabled_reason": row.disabled_reason,
        "failing_since": iso(row.failing_since) if row.failing_since else None,
        "previous_secret_expires_at": (
            iso(row.previous_secret_expires_at) if row.previous_secret_expires_at else None
        ),
        "created_at": iso(row.created_at),
    }
    if secret is not None:
        body["secret"] = secret
    return body


def delivery_body(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "endpoint_id": row.endpoint_id,
        "event_id": row.event_id,
        "status": row.status,
        "attempts": int(row.attempts),
        "next_attempt_at": iso(row.next_attempt_at) if row.status == "pending" else None,
        "last_attempt_at": iso(row.last_attempt_at) if row.last_attempt_at else None,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "delivered_at": iso(row.delivered_at) if row.delivered_at else None,
        "created_at": iso(row.created_at),
    }
