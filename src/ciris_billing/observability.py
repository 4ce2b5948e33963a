"""JSON logs with request ids, and Prometheus metrics (the guide's names)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
import traceback
from typing import Any, TextIO
from urllib.parse import parse_qsl

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("ciris_billing")

CREDIT_CHECKS = Counter(
    "billing_credit_checks_total", "Credit checks answered", ["purchase_required"]
)
CHARGES = Counter("billing_charges_total", "Charge attempts", ["success"])
RESERVATIONS = Counter(
    "billing_reservations_total",
    "Reservations by outcome (held, refused, captured, released, expired)",
    ["outcome"],
)
ACCOUNTS_CREATED = Counter("billing_accounts_created_total", "Accounts created")
PURCHASES = Counter("billing_purchases_total", "Purchases by outcome", ["provider", "status"])
WEBHOOK_EVENTS = Counter(
    "billing_webhook_events_total",
    "Webhook events by type and outcome",
    ["provider", "type", "outcome"],
)
# Background jobs (jobs.py). The gauge is set by whichever process ran the job last.
JOBS_QUEUE_DEPTH = Gauge(
    "billing_jobs_queue_depth",
    "Work waiting for the background jobs: unhandled webhook events, purchases not final past "
    "RECONCILE_AFTER_SECONDS, queued jobs",
    ["queue"],
    multiprocess_mode="mostrecent",
)
JOBS_RUNS = Counter("billing_jobs_runs_total", "Background job runs by outcome", ["job", "outcome"])
JOBS_ITEMS = Counter(
    "billing_jobs_items_total",
    "Webhook events retried and purchases reconciled by the background jobs, by outcome",
    ["job", "outcome"],
)
JOBS_FAILURES = Counter(
    "billing_jobs_failures_total",
    "Items a background job tried and failed (retried later)",
    ["job"],
)
# Outgoing webhooks (events/delivery.py).
WEBHOOK_DELIVERIES = Counter(
    "billing_webhook_deliveries_total",
    "Outgoing webhook delivery attempts by outcome (delivered, retry, failed: retries over, "
    "refused: the URL failed the SSRF guard)",
    ["outcome"],
)
WEBHOOK_DELIVERY_LATENCY = Histogram(
    "billing_webhook_delivery_duration_seconds",
    "Time for an endpoint to answer one outgoing webhook (timeouts included)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
WEBHOOK_ENDPOINTS_DISABLED = Counter(
    "billing_webhook_endpoints_disabled_total",
    "Webhook endpoints disabled after failing for 3 days in a row",
)
WEBHOOK_EVENTS_DISPATCHED = Counter(
    "billing_webhook_events_dispatched_total",
    "Outbox events fanned out to the webhook endpoints (a delivery per subscribed endpoint)",
)
BATCH_SIZE = Histogram(
    "billing_batch_size",
    "Requests served by one hot-path statement (PostgreSQL: those that queued up go together)",
    ["statement"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
STATEMENT_RETRIES = Counter(
    "billing_statement_retries_total",
    "Hot-path statements sent again after PostgreSQL rolled them back (deadlock, serialization)",
    ["sqlstate"],
)
RATE_LIMIT_FAIL_OPEN = Counter(
    "billing_rate_limit_fail_open_total",
    "Rate-limit checks let through because the shared store (Redis) was down or slower than 50 ms",
    ["limit"],
)
HTTP_LATENCY = Histogram(
    "billing_http_request_duration_seconds",
    "HTTP request latency by route template",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
# HTTP_LATENCY's series by (method, route, status): `labels()` checks, builds and looks up the
# series under a lock on every call; the few series a service serves are kept here once found.
# Bounded (methods are the client's to choose): past it, `labels()` as before.
_LATENCY_SERIES: dict[tuple[str, str, int], Any] = {}
_LATENCY_SERIES_MAX = 1_000


def observe_latency(method: str, template: str, status: int, seconds: float) -> None:
    series = _LATENCY_SERIES.get((method, template, status))
    if series is None:
        series = HTTP_LATENCY.labels(method, template, str(status))
        if len(_LATENCY_SERIES) < _LATENCY_SERIES_MAX:
            _LATENCY_SERIES[method, template, status] = series
    series.observe(seconds)


# The scope key under which a layer that serves a route itself (the fast path) names the route
# template it served; the framework's own routes are read from scope["route"].
ROUTE_TEMPLATE = "ciris_billing.route_template"


def safe_traceback(exc: BaseException) -> str:
    """An exception for the logs: where it was raised (frames and source lines) and its type,
    never its message. Messages carry input: a database error's SQL parameters and `detail`
    (`Key (email)=(...) already exists`), a webhook payload, a key in a URL."""
    lines: list[str] = []
    current: BaseException | None = exc
    for _ in range(5):  # the chain: the exception, what it came from, and so on
        if current is None:
            break
        sqlstate = getattr(current, "sqlstate", None) or getattr(
            getattr(current, "orig", None), "sqlstate", None
        )
        kind = f"{type(current).__module__}.{type(current).__qualname__}"
        lines.append("".join(traceback.format_tb(current.__traceback__)))
        lines.append(f"{kind}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "") + "\n")
        current = current.__cause__ or current.__context__
    return "".join(reversed(lines))


def _exception_without_message(_logger: Any, _method: str, event: dict[str, Any]) -> Any:
    """structlog processor (our events and the libraries', uvicorn's "Exception in ASGI
    application" included): `exc_info` becomes `exception` rendered by safe_traceback."""
    exc_info = event.pop("exc_info", None)
    if exc_info:
        if isinstance(exc_info, BaseException):
            exc: BaseException | None = exc_info
        elif isinstance(exc_info, tuple):
            exc = exc_info[1]
        else:
            exc = sys.exc_info()[1]
        if exc is not None:
            event["exception"] = safe_traceback(exc)
    return event


def configure_logging(level: str = "INFO", stream: TextIO = sys.stdout) -> None:
    """One JSON object per line on stdout, for our events and the libraries' (uvicorn) alike.

    Context vars (the request id) are merged into every line. Exceptions are logged without
    their messages (safe_traceback). uvicorn's access log is off (it writes raw paths and query
    strings): RequestContextMiddleware logs `http_request` with the route template instead.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _exception_without_message,
    ]
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # Also when run as `uvicorn ciris_billing.app:create_app --factory` (access log on).
    logging.getLogger("uvicorn.access").disabled = True
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )


def metrics_payload() -> tuple[bytes, str]:
    """The exposition text: across all worker processes when running multi-process."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


NO_STORE = (b"cache-control", b"no-store")


class RequestContextMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware cost): request id in logs and response, latency metric."""

    def __init__(self, app: ASGIApp, access_log: bool = True) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _incoming_request_id(scope) or secrets.token_hex(16)
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500
        header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", [])
                # Answers are about one client (balances, exports, keys): no cache may keep
                # them, unless the route said otherwise (static assets).
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    message["headers"] = [*headers, header, NO_STORE]
                else:
                    message["headers"] = [*headers, header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            template = scope.get(ROUTE_TEMPLATE) or _framework_route(scope) or "unmatched"
            observe_latency(scope["method"], template, status, elapsed)
            if self.access_log:
                # The route template, never the path (it may hold an email); the query's
                # names, and only harmless values (redacted_query).
                log.info(
                    "http_request",
                    method=scope["method"],
                    route=template,
                    status=status,
                    duration_ms=round(elapsed * 1000, 3),
                    query=redacted_query(scope.get("query_string", b"")),
                )
            structlog.contextvars.clear_contextvars()


# Query parameters whose values are logged (paging numbers); every other value is redacted.
_LOGGED_QUERY_VALUES = frozenset({"limit", "offset"})


def redacted_query(query_string: bytes) -> str:
    """The query string for the access log: every parameter's name, and its value only when
    the parameter is a paging number (`?api_key=cbk_...&external_id=a@b.c&limit=5` ->
    `api_key=[redacted]&external_id=[redacted]&limit=5`)."""
    if not query_string:
        return ""
    parts = []
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        shown = (
            value if name in _LOGGED_QUERY_VALUES and value.isdigit() and len(value) < 9 else None
        )
        safe_name = name if name.isidentifier() and len(name) <= 40 else "[redacted]"
        parts.append(f"{safe_name}={shown if shown is not None else '[redacted]'}")
    return "&".join(parts)


def _framework_route(scope: Scope) -> str | None:
    route: Any = scope.get("route")
    template: str | None = getattr(route, "path", None)
    return template


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text: str = value.decode("latin-1")
            # Accept only a sane id from callers; anything else gets a fresh one.
            if 0 < len(text) <= 128 and all(c.isalnum() or c in "-_.:" for c in text):
                return text
    return None


class BodySizeLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413, by Content-Length up front, or while
    reading a body sent without one, so an oversized body is never held in memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                await _too_large(send, self.max_bytes)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await _too_large(send, self.max_bytes)


class _BodyTooLarge(HTTPException):
    """Raised from `receive`: an HTTPException, so the framework passes it through as a 413."""

    def __init__(self) -> None:
        super().__init__(413, "Request body too large")


async def _too_large(send: Send, max_bytes: int) -> None:
    body = json.dumps(
        {"error": "payload_too_large", "detail": f"Request body over {max_bytes} bytes"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def credit_checks_served() -> int:
    """Credit checks answered since the service started (all worker processes when running
    multi-process): checks are not stored, so this counter is the only record of them."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        metrics = registry.collect()
    else:
        metrics = CREDIT_CHECKS.collect()
    return int(
        sum(
            sample.value
            for metric in metrics
            if metric.name == "billing_credit_checks"
            for sample in metric.samples
            if sample.name == "billing_credit_checks_total"
        )
    )
