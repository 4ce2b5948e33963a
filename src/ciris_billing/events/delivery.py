"""Delivering the outbox to webhook endpoints: at least once, retried with backoff for 3 days.

Two steps, both run by the job queue (jobs.py) and safe to run anywhere at any time:

- `dispatch` fans new events out: one `webhook_deliveries` row per (enabled, subscribed)
  endpoint and event, then marks the event dispatched, in one statement. Events are taken with
  FOR UPDATE SKIP LOCKED and deliveries are unique per (endpoint, event), so concurrent
  dispatchers never fan one event out twice.
- `deliver_endpoint` sends one endpoint's due deliveries, oldest first, with up to
  WEBHOOK_ENDPOINT_CONCURRENCY (10) in flight (one at a time, a receiver answering in 250 ms
  got 2.4 a second; receivers order an account's events by `data.sequence`). Each endpoint has
  a job of its own, so endpoints are served in parallel. A run stops taking new deliveries at
  its first attempt that timed out (the rest wait for the next run) or after RUN_SECONDS, so a
  hanging endpoint holds a job slot for about one WEBHOOK_TIMEOUT_SECONDS per run. A
  delivery is a POST of `{"type", "timestamp", "data"}` signed as Standard Webhooks
  (signing.py), `webhook-id` = the event's id, so a retry carries the same id and receivers can
  drop duplicates. A 2xx answer within WEBHOOK_TIMEOUT_SECONDS (10 s) is delivered; anything
  else is retried after WEBHOOK_RETRY_BASE_SECONDS (5 s), 4 times longer each time, at most 8 h
  apart (5 s, 20 s, 80 s, 5 min, 21 min, 85 min, 5.7 h, then every 8 h), until the delivery
  is 3 days old; then it is `failed` (an operator can resend it). An endpoint whose attempts
  have all failed for 3 days in a row is disabled, with an `endpoint.disabled` event and a log.

Each attempt's outcome is recorded in a transaction of its own, by a conditional UPDATE on the
delivery still pending with the attempts it was read with: a resend or a second runner
meanwhile never makes one attempt count twice. Sending is at least once by design: a worker
that dies between the receiver's 2xx and that record sends it again later, with the same id.

The clock is injectable (`clock`), so the schedule and the 3-day rules are tested without
waiting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
from sqlalchemy import Row, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing import __version__
from ciris_billing.clock import wall_now
from ciris_billing.config import Settings
from ciris_billing.db import events, iso, utcnow, webhook_deliveries, webhook_endpoints
from ciris_billing.errors import WebhookUrlRefused
from ciris_billing.events import endpoints as endpoint_rules
from ciris_billing.events import signing, ssrf
from ciris_billing.events.delivery_schedule import BATCH as BATCH
from ciris_billing.events.delivery_schedule import DISABLE_AFTER as DISABLE_AFTER
from ciris_billing.events.delivery_schedule import GROWTH as GROWTH
from ciris_billing.events.delivery_schedule import MAX_DELAY as MAX_DELAY
from ciris_billing.events.delivery_schedule import RETRY_FOR as RETRY_FOR
from ciris_billing.events.delivery_schedule import _dispatch_batch, _update_failing_run
from ciris_billing.events.delivery_schedule import retry_delay as retry_delay
from ciris_billing.events.delivery_schedule import schedule as schedule
from ciris_billing.observability import (
    JOBS_QUEUE_DEPTH,
    WEBHOOK_DELIVERIES,
    WEBHOOK_DELIVERY_LATENCY,
    WEBHOOK_ENDPOINTS_DISABLED,
    WEBHOOK_EVENTS_DISPATCHED,
    log,
)

# An endpoint's run takes no new delivery after this long (its job slot frees for others),
# nor after an attempt that failed slowly (the endpoint hangs: its next try is its retry's).
RUN_SECONDS = 30.0
SLOW_FAILURES = frozenset({"timeout", "dns_timeout"})
USER_AGENT = f"ciris-billing-webhooks/{__version__}"

Clock = Callable[[], datetime]


def event_body(event: Any) -> str:
    """The delivered JSON body of an outbox event (the same bytes on every attempt)."""
    return json.dumps(
        {"type": event.type, "timestamp": iso(event.created_at), "data": event.data},
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to."""

    delivered: bool
    status_code: int | None = None
    error: str | None = None  # a failure's kind: http_<status>, timeout, connect_error, ...


@dataclass
class EndpointRun:
    endpoint_id: str
    delivered: int = 0
    failed: int = 0  # attempts that failed (retried later, or given up)
    disabled: bool = False


@dataclass
class DeliveryReport:
    dispatched: int = 0
    runs: list[EndpointRun] = field(default_factory=list)

    @property
    def delivered(self) -> int:
        return sum(run.delivered for run in self.runs)


class Deliveries:
    """The outbox's delivery, for one process (the jobs, the CLI, tests)."""

    def __init__(self, engine: AsyncEngine, settings: Settings, *, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.settings = settings
        self.clock = clock
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.settings.webhook_timeout_seconds),
                follow_redirects=False,  # a redirect could lead anywhere: it is a failure
                trust_env=False,  # no proxy from the environment between us and the receiver
                headers={"user-agent": USER_AGENT},
                # A new connection per delivery: connections are pooled by address, and two
                # endpoints' hosts on one address must not share one whose TLS was checked for
                # the other's name.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---------------------------------------------------------------------------- dispatch

    async def dispatch(self) -> int:
        """Fan undispatched events out to the endpoints; how many events were dispatched."""
        now = self.clock()
        total = 0
        while True:
            async with self.engine.begin() as conn:
                count = await _dispatch_batch(conn, now)
            total += count
            if count < BATCH:
                break
        if total:
            WEBHOOK_EVENTS_DISPATCHED.inc(total)
        return total

    async def due_endpoints(self) -> list[str]:
        """Enabled endpoints with deliveries due now."""
        return [endpoint_id for endpoint_id, _failing in await self.due_endpoints_failing()]

    async def due_endpoints_failing(self) -> list[tuple[str, bool]]:
        """Enabled endpoints with deliveries due now, and whether each is failing (its last
        attempt failed: the jobs serve those in a lane of their own)."""
        now = self.clock()
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(
                    webhook_deliveries.c.endpoint_id,
                    webhook_endpoints.c.failing_since.is_not(None).label("failing"),
                )
                .join(webhook_endpoints, webhook_endpoints.c.id == webhook_deliveries.c.endpoint_id)
                .where(
                    webhook_deliveries.c.status == "pending",
                    webhook_deliveries.c.next_attempt_at <= now,
                    webhook_endpoints.c.status == "enabled",
                )
                .group_by(webhook_deliveries.c.endpoint_id, webhook_endpoints.c.failing_since)
            )
            return [(row.endpoint_id, bool(row.failing)) for row in rows]

    async def run_once(self) -> DeliveryReport:
        """Dispatch, then deliver every endpoint's due deliveries, endpoints in parallel (at
        most WEBHOOK_DELIVERY_CONCURRENCY at once). What the jobs do, in one call."""
        report = DeliveryReport(dispatched=await self.dispatch())
        turns = asyncio.Semaphore(self.settings.webhook_delivery_concurrency)

        async def one(endpoint_id: str) -> EndpointRun:
            async with turns:
                return await self.deliver_endpoint(endpoint_id)

        report.runs = list(await asyncio.gather(*(one(e) for e in await self.due_endpoints())))
        return report

    # ---------------------------------------------------------------------------- delivery

    async def deliver_endpoint(self, endpoint_id: str) -> EndpointRun:
        """Send the endpoint's due deliveries (oldest event first), up to
        WEBHOOK_ENDPOINT_CONCURRENCY in flight, until none is due, one failed, or RUN_SECONDS."""
        run = EndpointRun(endpoint_id)
        deadline = asyncio.get_running_loop().time() + RUN_SECONDS
        in_flight = asyncio.Semaphore(self.settings.webhook_endpoint_concurrency)
        stop = asyncio.Event()  # a failure, the endpoint gone or disabled: no new sends
        sending: set[asyncio.Task[None]] = set()
        taken: set[str] = set()  # delivery ids sent in this run (a read may see them again)
        errors: list[Exception] = []

        async def one(endpoint: Row[Any], delivery: Any) -> None:
            try:
                attempt = await self._send(endpoint, delivery)
                if attempt.delivered:
                    run.delivered += 1
                else:
                    run.failed += 1
                if attempt.error in SLOW_FAILURES:
                    stop.set()
                if await self._record(endpoint, delivery, attempt):
                    run.disabled = True
                    stop.set()
            except Exception as exc:  # raised by the run once its sends are over
                errors.append(exc)
                stop.set()
            finally:
                in_flight.release()

        try:
            while not stop.is_set() and asyncio.get_running_loop().time() < deadline:
                due = [d for d in await self._due(endpoint_id) if d.id not in taken]
                if not due:
                    if not sending:
                        break
                    await asyncio.wait(sending, return_when=asyncio.FIRST_COMPLETED)
                    continue
                for delivery in due:
                    await in_flight.acquire()
                    if stop.is_set() or asyncio.get_running_loop().time() >= deadline:
                        in_flight.release()
                        break
                    endpoint = await self._endpoint(endpoint_id)
                    if endpoint is None or endpoint.status != "enabled":
                        in_flight.release()
                        stop.set()  # deleted or disabled meanwhile
                        break
                    taken.add(delivery.id)
                    task = asyncio.create_task(one(endpoint, delivery))
                    sending.add(task)
                    task.add_done_callback(sending.discard)
        except asyncio.CancelledError:
            # The worker is stopping: the attempts in flight end with it (at least once: they
            # stay pending and are sent again).
            for task in sending:
                task.cancel()
            await asyncio.gather(*sending, return_exceptions=True)
            raise
        if sending:
            await asyncio.gather(*sending)
        if errors:
            raise errors[0]
        return run

    async def _due(self, endpoint_id: str) -> list[Any]:
        async with self.engine.connect() as conn:
            return list(
                await conn.execute(
                    select(
                        webhook_deliveries.c.id,
                        webhook_deliveries.c.attempts,
                        webhook_deliveries.c.created_at,
                        events.c.id.label("event_id"),
                        events.c.type,
                        events.c.data,
                        events.c.created_at.label("event_created_at"),
                    )
                    .join(events, events.c.id == webhook_deliveries.c.event_id)
                    .where(
                        webhook_deliveries.c.endpoint_id == endpoint_id,
                        webhook_deliveries.c.status == "pending",
                        webhook_deliveries.c.next_attempt_at <= self.clock(),
                    )
                    .order_by(events.c.created_at, events.c.id)
                    .limit(BATCH)
                )
            )

    async def _endpoint(self, endpoint_id: str) -> Row[Any] | None:
        async with self.engine.connect() as conn:
            return (
                await conn.execute(
                    select(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id)
                )
            ).first()

    async def _send(self, endpoint: Row[Any], delivery: Any) -> Attempt:
        now = self.clock()
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_seconds):
                target = await ssrf.safe_target(
                    endpoint.url, allow_private=self.settings.allow_private_webhook_urls
                )
        except TimeoutError:
            return Attempt(False, error="dns_timeout")
        except WebhookUrlRefused as exc:
            WEBHOOK_DELIVERIES.labels("refused").inc()
            log.warning(
                "webhook_url_refused",
                endpoint_id=endpoint.id,
                delivery_id=delivery.id,
                reason=exc.detail,
            )
            return Attempt(False, error="url_refused")
        body = event_body(_EventView(delivery.type, delivery.event_created_at, delivery.data))
        # The receiver checks webhook-timestamp against its own clock: the real time of sending,
        # never the sandbox's test clock (the injected clock decides only what is due and which
        # secrets are in force).
        in_force = endpoint_rules.secrets_in_force(endpoint, now)
        headers = {
            **signing.headers(in_force, delivery.event_id, wall_now(), body),
            "content-type": "application/json",
        }
        if target.host_header is not None:
            headers["host"] = target.host_header
        extensions = {"sni_hostname": target.server_name} if target.server_name else None
        started = asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(self.settings.webhook_timeout_seconds):
                request = self._http().build_request(
                    "POST",
                    target.url,
                    content=body.encode(),
                    headers=headers,
                    extensions=extensions,
                )
                # The answer's body is never read: only its status counts.
                response = await self._http().send(request, stream=True)
                await response.aclose()
        except TimeoutError:
            return Attempt(False, error="timeout")
        except httpx.TimeoutException:
            return Attempt(False, error="timeout")
        except httpx.HTTPError as exc:
            return Attempt(False, error=_error_kind(exc))
        finally:
            WEBHOOK_DELIVERY_LATENCY.observe(asyncio.get_running_loop().time() - started)
        if 200 <= response.status_code < 300:
            return Attempt(True, status_code=response.status_code)
        return Attempt(
            False, status_code=response.status_code, error=f"http_{response.status_code}"
        )

    async def _record(self, endpoint: Row[Any], delivery: Any, attempt: Attempt) -> bool:
        """Record the attempt (retry time, or retries over) and the endpoint's run of failures;
        True when this failure disabled the endpoint."""
        now = self.clock()
        base = self.settings.webhook_retry_base_seconds
        # Every earlier attempt of a pending delivery failed: this is failure number `attempts`
        # if it failed too.
        attempts = int(delivery.attempts) + 1
        if attempt.delivered:
            status, next_at = "delivered", now
        elif now >= delivery.created_at + RETRY_FOR:
            status, next_at = "failed", now
        else:
            status, next_at = "pending", now + retry_delay(attempts, base)
        async with self.engine.begin() as conn:
            # Lock order: the endpoint's row, then its delivery's (as DELETE's cascade does).
            locked = (
                await conn.execute(
                    select(webhook_endpoints.c.id)
                    .where(webhook_endpoints.c.id == endpoint.id)
                    .with_for_update()
                )
            ).first()
            # Safe: counted once. Only a delivery still pending with the attempts read before
            # the POST is updated; a resend or another runner meanwhile leaves it to them.
            counted = await conn.execute(
                webhook_deliveries.update()
                .where(
                    webhook_deliveries.c.id == delivery.id,
                    webhook_deliveries.c.status == "pending",
                    webhook_deliveries.c.attempts == delivery.attempts,
                )
                .values(
                    status=status,
                    attempts=attempts,
                    next_attempt_at=next_at,
                    last_attempt_at=now,
                    last_status_code=attempt.status_code,
                    last_error=attempt.error,
                    delivered_at=now if attempt.delivered else None,
                )
                .returning(webhook_deliveries.c.id)
            )
            if locked is None or counted.first() is None:
                return False
            disabled = await _update_failing_run(conn, endpoint.id, attempt.delivered, now)
        self._log(endpoint.id, delivery, attempt, status, attempts, next_at)
        if disabled:
            WEBHOOK_ENDPOINTS_DISABLED.inc()
            log.error(
                "webhook_endpoint_disabled",
                endpoint_id=endpoint.id,
                reason="failing for 3 days in a row",
            )
        return disabled

    def _log(
        self,
        endpoint_id: str,
        delivery: Any,
        attempt: Attempt,
        status: str,
        attempts: int,
        next_at: datetime,
    ) -> None:
        where = {
            "endpoint_id": endpoint_id,
            "delivery_id": delivery.id,
            "event_id": delivery.event_id,
            "event_type": delivery.type,
            "attempt": attempts,
        }
        if attempt.delivered:
            WEBHOOK_DELIVERIES.labels("delivered").inc()
            log.info("webhook_delivered", status_code=attempt.status_code, **where)
        elif status == "failed":
            WEBHOOK_DELIVERIES.labels("failed").inc()
            log.warning("webhook_delivery_given_up", error=attempt.error, **where)
        else:
            WEBHOOK_DELIVERIES.labels("retry").inc()
            log.warning(
                "webhook_delivery_failed",
                error=attempt.error,
                next_attempt_at=iso(next_at),
                **where,
            )

    # ---------------------------------------------------------------------------- metrics

    async def measure(self) -> None:
        now = self.clock()
        async with self.engine.connect() as conn:
            waiting = await conn.scalar(
                select(func.count())
                .select_from(webhook_deliveries)
                .where(
                    webhook_deliveries.c.status == "pending",
                    webhook_deliveries.c.next_attempt_at <= now,
                )
            )
            undispatched = await conn.scalar(
                select(func.count()).select_from(events).where(events.c.dispatched_at.is_(None))
            )
        JOBS_QUEUE_DEPTH.labels("webhook_deliveries").set(int(waiting or 0))
        JOBS_QUEUE_DEPTH.labels("events").set(int(undispatched or 0))


@dataclass(frozen=True, slots=True)
class _EventView:
    type: str
    created_at: datetime
    data: Any


def _error_kind(exc: httpx.HTTPError) -> str:
    """A failure's kind for the record and logs (never its message: it may quote the URL)."""
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "protocol_error"
    return type(exc).__name__
