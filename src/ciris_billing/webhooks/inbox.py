"""The webhook inbox: verify, store, then handle each provider event exactly once.

1. The signature is checked on the raw body before anything else (bad: 400, nothing stored).
2. The event is stored under a unique (provider, event id): redeliveries add nothing.
3. The payment (or dispute) is fetched from the provider (no money state is ever taken from
   an event body; a dispute the provider does not know is recorded as `unknown_dispute` and
   changes nothing), then applied
   and the event marked handled in one transaction, with the event row locked so concurrent
   deliveries of one event queue up and find it handled. A failure (a provider error, a lost
   database connection) leaves it unhandled, counts the attempt with its error and a time to
   retry, and answers 5xx: the background job (jobs.py) retries it with backoff, as would the
   provider or `ciris-billing webhooks replay`.

Provider-neutral: the provider parses its events into our types (`WebhookEvent.subject`: a
payment, refund or dispute event); a stored event is parsed again by its provider on handling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.db import insert_or_ignore, new_id, utcnow, webhook_events
from ciris_billing.errors import BillingError, InvalidWebhookSignature
from ciris_billing.observability import WEBHOOK_EVENTS, log
from ciris_billing.payments import service as payments
from ciris_billing.payments.disputes import apply_dispute
from ciris_billing.payments.providers.base import (
    Dispute,
    DisputeEvent,
    PaymentProvider,
    PaymentResult,
    WebhookEvent,
)
from ciris_billing.unit_of_work import UnitOfWork


@dataclass(frozen=True, slots=True)
class Handled:
    event_id: str
    outcome: str


async def receive(
    work: UnitOfWork,
    provider: PaymentProvider,
    payload: bytes,
    signature: str | None,
    *,
    retry_base_seconds: float = 10,
) -> Handled:
    event = await provider.verify_webhook(payload, signature or "")
    _check_storable(event)
    log.info(
        f"{provider.name}_webhook_received",
        event_id=event.event_id,
        event_type=event.type,
        payment_id=event.payment_id,
    )
    await store(await work.connection(), provider.name, event)
    return await handle(work, provider, event.event_id, retry_base_seconds=retry_base_seconds)


def _fits(value: object, max_length: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= max_length and value.isprintable()


def _check_storable(event: WebhookEvent) -> None:
    """A signed body is still input: an id, type or payment id that is not a short printable
    string (too long for its column, a NUL PostgreSQL refuses) is a bad event, not a 500."""
    if not (
        _fits(event.event_id, 255)
        and _fits(event.type, 100)
        and (event.payment_id is None or _fits(event.payment_id, 255))
    ):
        raise InvalidWebhookSignature("The signed webhook body is not a valid event")


async def store(conn: AsyncConnection, provider: str, event: WebhookEvent) -> None:
    """Store the event once (a redelivery inserts nothing: unique provider + event id)."""
    await conn.execute(
        insert_or_ignore(webhook_events).values(
            id=new_id("whe"),
            provider=provider,
            event_id=event.event_id,
            type=event.type,
            payment_id=event.payment_id,
            payload=json.dumps(event.payload, separators=(",", ":")),
            received_at=utcnow(),
            handled_at=None,
            outcome=None,
            attempts=0,
            last_error=None,
        )
    )


def _event_clause(provider: str, event_id: str) -> Any:
    return (webhook_events.c.provider == provider) & (webhook_events.c.event_id == event_id)


# A failed event is retried after base * 2**(attempts - 1) seconds, at most this long.
MAX_RETRY_DELAY = timedelta(minutes=15)


def next_attempt_at(attempts: int, base_seconds: float, now: datetime) -> datetime:
    """When an event that failed `attempts` times may be tried again (exponential backoff)."""
    delay = timedelta(seconds=base_seconds * 2 ** min(max(attempts - 1, 0), 20))
    return now + min(delay, MAX_RETRY_DELAY)


async def handle(
    work: UnitOfWork,
    provider: PaymentProvider,
    event_id: str,
    *,
    retry_base_seconds: float = 10,
) -> Handled:
    """Handle a stored event unless it was already; safe to call any number of times."""
    where = _event_clause(provider.name, event_id)
    row = (await (await work.connection()).execute(select(webhook_events).where(where))).one()
    if row.handled_at is not None:
        return _done(provider.name, row.type, event_id, "duplicate")
    try:
        # Ask the provider first, outside any transaction: no lock is held while it answers
        # (provider_call also commits the stored event, so it survives whatever follows).
        subject = provider.parse_event(row.payload.encode()).subject
        payment: PaymentResult | None = None
        dispute: Dispute | None = None
        async with work.provider_call():
            if isinstance(subject, DisputeEvent):
                dispute = await _current_dispute(provider, subject)
                if dispute is None:
                    log.warning(
                        f"{provider.name}_webhook_unknown_dispute",
                        event_id=event_id,
                        dispute_id=subject.dispute_id,
                    )
            elif subject is not None and subject.payment_id:
                # Payment and refund events alike: the payment now carries its refunded total.
                payment = await provider.get_payment(subject.payment_id)
        conn = await work.connection()
        # The event row locked: concurrent deliveries of one event queue up here and find it
        # handled, so it is applied once.
        locked = (await conn.execute(select(webhook_events).where(where).with_for_update())).one()
        if locked.handled_at is not None:
            return _done(provider.name, row.type, event_id, "duplicate")
        if payment is not None:
            outcome = await payments.apply_payment(conn, provider.name, payment)
        elif dispute is not None:
            outcome = await apply_dispute(conn, provider.name, dispute)
        elif isinstance(subject, DisputeEvent):
            outcome = "unknown_dispute"
        elif subject is not None:
            outcome = "unknown_payment"
        else:
            outcome = "ignored"
        await conn.execute(
            webhook_events.update()
            .where(where)
            .values(
                handled_at=utcnow(),
                outcome=outcome,
                attempts=webhook_events.c.attempts + 1,
                last_error=None,
                next_attempt_at=None,
            )
        )
    except Exception as exc:
        # Any failure, not only ours: a killed database connection must be counted too. Only
        # the error's code or class is kept (its message may quote SQL parameters or payloads).
        error = exc.code if isinstance(exc, BillingError) else type(exc).__name__
        await work.rollback()  # nothing of this attempt is applied
        await _record_failure(work.engine, where, error, int(row.attempts) + 1, retry_base_seconds)
        WEBHOOK_EVENTS.labels(provider.name, row.type, "retry").inc()
        log.warning(
            f"{provider.name}_webhook_failed",
            event_id=event_id,
            event_type=row.type,
            error=error,
        )
        raise
    return _done(provider.name, row.type, event_id, outcome)


async def _current_dispute(provider: PaymentProvider, event: DisputeEvent) -> Dispute | None:
    """The dispute as the provider reports it, with the payment it disputes; None when the
    provider does not know it (or not its payment): then nothing is applied."""
    if event.dispute_id is None:
        return None
    found = await provider.get_dispute(event.dispute_id)
    if found is None or not found.payment_id:
        return None
    return found


async def _record_failure(
    engine: AsyncEngine, where: Any, error: str, attempts: int, base_seconds: float
) -> None:
    """Count the attempt, its error and when to retry, in a unit of work of its own (kept
    whatever becomes of the failed one). Best effort: when the database is what failed this may
    fail too, and the event, still unhandled and due, is retried all the same. Only an
    unhandled event is touched (a concurrent attempt may have handled it meanwhile)."""
    try:
        async with engine.begin() as conn:
            await conn.execute(
                webhook_events.update()
                .where(where, webhook_events.c.handled_at.is_(None))
                .values(
                    attempts=webhook_events.c.attempts + 1,
                    last_error=error[:500],
                    next_attempt_at=next_attempt_at(attempts, base_seconds, utcnow()),
                )
            )
    except Exception as exc:
        log.warning("webhook_failure_not_recorded", error=type(exc).__name__)


def _done(provider: str, event_type: str, event_id: str, outcome: str) -> Handled:
    WEBHOOK_EVENTS.labels(provider, event_type, outcome).inc()
    log.info(
        f"{provider}_webhook_handled", event_id=event_id, event_type=event_type, outcome=outcome
    )
    return Handled(event_id, outcome)


async def due_event_ids(
    engine: AsyncEngine, provider: str, now: datetime, received_before: datetime, limit: int
) -> list[str]:
    """Unhandled events whose retry time has come (or never failed visibly: a worker killed
    mid-way), oldest first; only those received before `received_before`, so an event that is
    being handled by its own delivery right now is left to it."""
    async with engine.connect() as conn:
        result = await conn.execute(
            select(webhook_events.c.event_id)
            .where(
                webhook_events.c.provider == provider,
                webhook_events.c.handled_at.is_(None),
                webhook_events.c.received_at <= received_before,
                (webhook_events.c.next_attempt_at.is_(None))
                | (webhook_events.c.next_attempt_at <= now),
            )
            .order_by(webhook_events.c.received_at)
            .limit(limit)
        )
        return [row.event_id for row in result]


async def unhandled_event_ids(engine: AsyncEngine, provider: str) -> list[str]:
    async with engine.connect() as conn:
        result = await conn.execute(
            select(webhook_events.c.event_id)
            .where(webhook_events.c.provider == provider, webhook_events.c.handled_at.is_(None))
            .order_by(webhook_events.c.received_at)
        )
        return [row.event_id for row in result]
