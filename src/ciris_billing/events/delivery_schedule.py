"""Scheduling the outbox's deliveries (events/delivery.py): the retry schedule, the dispatch that
fans events out to endpoints, and an endpoint's run of failures (disabled after 3 days)."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import iso, webhook_endpoints
from ciris_billing.events.outbox import ENDPOINT_DISABLED, record_event

GROWTH = 4  # each retry waits this many times longer than the one before
MAX_DELAY = timedelta(hours=8)
RETRY_FOR = timedelta(days=3)  # a delivery is retried until it is this old
DISABLE_AFTER = timedelta(days=3)  # an endpoint failing this long in a row is disabled
BATCH = 100  # events per dispatch, deliveries per read of an endpoint's due ones


def retry_delay(failures: int, base_seconds: float) -> timedelta:
    """How long after its `failures`-th failed attempt a delivery is tried again."""
    growth = float(GROWTH ** min(max(failures - 1, 0), 20))
    return min(timedelta(seconds=base_seconds * growth), MAX_DELAY)


def schedule(base_seconds: float) -> list[timedelta]:
    """Every attempt's time after the first, until the retries are over (for docs and tests)."""
    times, at, failures = [], timedelta(0), 0
    while at < RETRY_FOR:
        failures += 1
        at += retry_delay(failures, base_seconds)
        times.append(at)
    return times


# Fan a batch of undispatched events out and mark them dispatched, in one statement. Safe with
# several dispatchers at once: SKIP LOCKED gives each its own events, and a delivery is unique
# per (endpoint, event) (ON CONFLICT DO NOTHING). An endpoint gets the events that happened
# after it was created, if it subscribed to their type and is enabled when they go out.
_DISPATCH_SQL = text(
    """
    WITH batch AS (
        SELECT id, type, created_at FROM events
        WHERE dispatched_at IS NULL
        ORDER BY created_at
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    ), fanned AS (
        INSERT INTO webhook_deliveries (id, endpoint_id, event_id, status, attempts,
                                        next_attempt_at, created_at)
        SELECT 'whd_' || replace(gen_random_uuid()::text, '-', ''), e.id, b.id, 'pending', 0,
               :now, :now
        FROM batch b
        JOIN webhook_endpoints e
          ON e.status = 'enabled' AND e.created_at <= b.created_at
         AND (e.events IS NULL OR json_typeof(e.events) = 'null' OR (e.events)::jsonb ? b.type)
        ON CONFLICT (endpoint_id, event_id) DO NOTHING
    )
    UPDATE events SET dispatched_at = :now FROM batch WHERE events.id = batch.id
    """
)


async def _dispatch_batch(conn: AsyncConnection, now: datetime) -> int:
    result = await conn.execute(_DISPATCH_SQL, {"batch": BATCH, "now": now})
    return int(result.rowcount or 0)


async def _update_failing_run(
    conn: AsyncConnection, endpoint_id: str, delivered: bool, now: datetime
) -> bool:
    """The endpoint's run of failures after one attempt; True when it disabled the endpoint
    (its row is locked by the caller, so this is decided once)."""
    if delivered:
        await conn.execute(
            webhook_endpoints.update()
            .where(
                webhook_endpoints.c.id == endpoint_id,
                webhook_endpoints.c.failing_since.is_not(None),
            )
            .values(failing_since=None)
        )
        return False
    row = (
        await conn.execute(
            webhook_endpoints.update()
            .where(webhook_endpoints.c.id == endpoint_id)
            .values(failing_since=func.coalesce(webhook_endpoints.c.failing_since, now))
            .returning(
                webhook_endpoints.c.failing_since,
                webhook_endpoints.c.status,
                webhook_endpoints.c.description,
            )
        )
    ).one()
    if row.status != "enabled" or row.failing_since > now - DISABLE_AFTER:
        return False
    await conn.execute(
        webhook_endpoints.update()
        .where(webhook_endpoints.c.id == endpoint_id)
        .values(
            status="disabled",
            disabled_reason="failing for 3 days in a row",
            updated_at=now,
        )
    )
    # With the change it reports (the endpoint itself, disabled, does not receive it).
    await record_event(
        conn,
        None,
        ENDPOINT_DISABLED,
        {
            "endpoint_id": endpoint_id,
            "description": row.description,
            "reason": "failing for 3 days in a row",
            "failing_since": iso(row.failing_since),
        },
    )
    return True
