"""The sandbox's webhooks as Stripe sends them: at least once, redelivered with backoff.

Stripe keeps an event until the endpoint answers 2xx and retries it for days. The sandbox did
one attempt in process after the payment's change was committed, so a worker killed in between
lost the webhook, and the payer's uses waited for reconciliation (issue 22 item 4: ~178 s).
Now a payment's event, a refund's `charge.refunded` and a dispute's `charge.dispute.*` are
recorded in `sandbox_webhook_events` in the same transaction as the change they announce, sent
at once, and, until the service's inbox took them, sent again by the background jobs (jobs.py,
in `serve` or `ciris-billing worker`) REDELIVER_BASE_SECONDS later, twice as long each time (at
most REDELIVER_MAX_SECONDS apart), for REDELIVER_FOR. The body is built when sent, from the
payment, charge or dispute as it is then (the inbox never trusts a body: it asks the provider).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.db import sandbox_webhook_events, utcnow
from ciris_billing.observability import log
from ciris_billing.payments.providers import signing

Deliver = Callable[[bytes, str], Awaitable[Any]]
# What an event's `data.object` is when it is sent, from its type and payment (the payment, its
# charge or its dispute as it is then).
Snapshot = Callable[[str, str], Awaitable[dict[str, Any]]]

REDELIVER_BASE_SECONDS = 5.0
REDELIVER_MAX_SECONDS = 3600.0
REDELIVER_FOR = timedelta(days=3)
BATCH = 100


def redeliver_delay(attempts: int) -> timedelta:
    """How long after its `attempts`-th failed attempt an event is sent again."""
    return timedelta(
        seconds=min(
            REDELIVER_BASE_SECONDS * 2 ** min(max(attempts - 1, 0), 20), REDELIVER_MAX_SECONDS
        )
    )


def sign_event(
    secret: str, event_id: str, event_type: str, data_object: dict[str, Any]
) -> tuple[bytes, str]:
    """A Stripe-shaped event's body and its Stripe-Signature header."""
    # The provider's own clock, as Stripe's (the sandbox's test clock moves ours, not its):
    # wall-clock time, like the signature's timestamp checked against it.
    created = int(time.time())
    event = {
        "id": event_id,
        "object": "event",
        "type": event_type,
        "created": created,
        "livemode": False,
        "data": {"object": data_object},
    }
    payload = json.dumps(event, separators=(",", ":")).encode()
    return payload, signing.sign(payload, secret, created)


class SandboxWebhooks:
    """The sandbox's outgoing events, payments', refunds' and disputes' (recorded, sent,
    redelivered)."""

    def __init__(self, secret: str, deliver: Deliver | None, snapshot: Snapshot) -> None:
        self._secret = secret
        self._deliver = deliver
        self._snapshot = snapshot

    async def record(self, conn: AsyncConnection, event_type: str, payment_id: str) -> str:
        """Record an event about a payment (its status, a refund, a dispute) in the caller's
        transaction (the change it announces)."""
        event_id = "evt_sbx_" + secrets.token_hex(12)
        now = utcnow()
        await conn.execute(
            sandbox_webhook_events.insert().values(
                id=event_id,
                type=event_type,
                payment_id=payment_id,
                attempts=0,
                # Due for redelivery only if this first attempt does not get through.
                next_attempt_at=now + redeliver_delay(1),
                created_at=now,
            )
        )
        return event_id

    async def send(
        self, engine: AsyncEngine, event_id: str, event_type: str, payment_id: str
    ) -> bool:
        """One attempt; recorded as delivered, or due again after the backoff."""
        if self._deliver is None:
            return False
        payload, signature = sign_event(
            self._secret, event_id, event_type, await self._snapshot(event_type, payment_id)
        )
        try:
            await self._deliver(payload, signature)
            delivered = True
        except Exception as exc:  # retried by redeliver_due, as Stripe retries
            log.warning(
                "sandbox_webhook_delivery_failed", event_type=event_type, error=type(exc).__name__
            )
            delivered = False
        now = utcnow()
        async with engine.begin() as conn:
            if delivered:
                await conn.execute(
                    sandbox_webhook_events.update()
                    .where(sandbox_webhook_events.c.id == event_id)
                    .values(delivered_at=now, attempts=sandbox_webhook_events.c.attempts + 1)
                )
            else:
                # Safe beside another sender: the attempts are counted in the UPDATE itself.
                await conn.execute(
                    sandbox_webhook_events.update()
                    .where(
                        sandbox_webhook_events.c.id == event_id,
                        sandbox_webhook_events.c.delivered_at.is_(None),
                    )
                    .values(attempts=sandbox_webhook_events.c.attempts + 1)
                )
                attempts = (
                    await conn.execute(
                        select(sandbox_webhook_events.c.attempts).where(
                            sandbox_webhook_events.c.id == event_id
                        )
                    )
                ).scalar_one()
                await conn.execute(
                    sandbox_webhook_events.update()
                    .where(sandbox_webhook_events.c.id == event_id)
                    .values(next_attempt_at=now + redeliver_delay(int(attempts)))
                )
        return delivered

    async def redeliver_due(self, engine: AsyncEngine) -> int:
        """Send again every event not yet taken whose next attempt is due; how many got through."""
        if self._deliver is None:
            return 0
        now = utcnow()
        async with engine.connect() as conn:
            due = list(
                await conn.execute(
                    select(
                        sandbox_webhook_events.c.id,
                        sandbox_webhook_events.c.type,
                        sandbox_webhook_events.c.payment_id,
                    )
                    .where(
                        sandbox_webhook_events.c.delivered_at.is_(None),
                        sandbox_webhook_events.c.next_attempt_at <= now,
                        sandbox_webhook_events.c.created_at >= now - REDELIVER_FOR,
                    )
                    .order_by(sandbox_webhook_events.c.next_attempt_at)
                    .limit(BATCH)
                )
            )
        delivered = 0
        for event in due:
            if await self.send(engine, event.id, event.type, event.payment_id):
                delivered += 1
        if due:
            log.info("sandbox_webhooks_redelivered", due=len(due), delivered=delivered)
        return delivered
