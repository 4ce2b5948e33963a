"""create_app(): settings, lifespan (database, keys), routers, and the one error shape."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import asyncpg
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ciris_billing import __version__, openapi
from ciris_billing.accounts.admin_routes import router as admin_router
from ciris_billing.accounts.hot.asgi import HotPath
from ciris_billing.accounts.hot.holds import CaptureStore, HoldStore
from ciris_billing.accounts.hot.pool import StatementPool
from ciris_billing.accounts.hot.reader import AccountReader
from ciris_billing.accounts.hot.writer import ChargeStore
from ciris_billing.accounts.lot_routes import router as lots_router
from ciris_billing.accounts.reservation_routes import router as reservations_router
from ciris_billing.accounts.routes import router as accounts_router
from ciris_billing.auth import API_KEY_HEADER, BEARER, KeyStore, chosen_key, same_secret
from ciris_billing.autotopup.routes import router as auto_topup_router
from ciris_billing.catalog.routes import router as catalog_router
from ciris_billing.checkout.routes import router as checkout_router
from ciris_billing.config import Settings, get_settings
from ciris_billing.console.action_routes import router as console_actions_router
from ciris_billing.console.catalog import router as console_catalog_router
from ciris_billing.console.rates import router as console_rates_router
from ciris_billing.console.report_routes import router as console_reports_router
from ciris_billing.console.routes import router as console_router
from ciris_billing.db import create_engine, session_settings
from ciris_billing.deps import AppState, StateDep, authorize_key, json_response
from ciris_billing.edge import RouteGate
from ciris_billing.errors import error_responses
from ciris_billing.errors_http import RENDERED, error_response
from ciris_billing.events.routes import router as webhook_endpoints_router
from ciris_billing.installation import load as load_installation_secrets
from ciris_billing.jobs import running_jobs
from ciris_billing.observability import (
    BodySizeLimitMiddleware,
    RequestContextMiddleware,
    configure_logging,
    log,
    metrics_payload,
)
from ciris_billing.payments.providers import get_payment_provider
from ciris_billing.payments.routes import router as payments_router
from ciris_billing.payments.sandbox_routes import router as sandbox_router
from ciris_billing.portal.link_routes import router as portal_links_router
from ciris_billing.portal.routes import router as portal_router
from ciris_billing.pricing import Pricing
from ciris_billing.ratelimit import (
    FailureLimit,
    Limiter,
    SharedBuckets,
    SharedStore,
    TokenBuckets,
)
from ciris_billing.rates.book import RateBook
from ciris_billing.rates.routes import router as rates_router
from ciris_billing.reports.routes import router as reports_router
from ciris_billing.testclock import store as test_clock
from ciris_billing.testclock.routes import router as test_clock_router
from ciris_billing.web.docs import router as docs_router
from ciris_billing.webhooks.local_delivery import to_inbox
from ciris_billing.webhooks.routes import router as webhooks_router

# /health answers 503 rather than wait longer than this for the database (a load balancer's
# health check must not hang while a connection attempt times out).
HEALTH_TIMEOUT_SECONDS = 3


class BillingApp(FastAPI):
    """FastAPI, entered through the service's own ASGI layers: request ids and the latency
    metric, the body-size limit, then the hot path (accounts/hot/asgi.py) ahead of the
    framework's own middleware and routing. As plain ASGI layers around the app rather than
    middleware inside it, they spare the two hot routes the framework's per-request layers
    (profiled: a tenth of a credit check's CPU). Lifespan and everything else pass straight
    through them."""

    def __init__(self, *, max_request_bytes: int, access_log: bool, **options: Any) -> None:
        super().__init__(**options)
        self._max_request_bytes = max_request_bytes
        self._access_log = access_log
        self._entry: ASGIApp = super().__call__

    def _layers(self, inner: ASGIApp, parsed_elsewhere: frozenset[str]) -> ASGIApp:
        # The edge (route template, the API key before the body, strict JSON) inside the body
        # limit, so a body it reads is never over MAX_REQUEST_BYTES.
        gate = RouteGate(inner, self, parsed_elsewhere)
        limited = BodySizeLimitMiddleware(gate, self._max_request_bytes)
        return RequestContextMiddleware(limited, self._access_log)

    def serve_edge(self, hot_path: bool) -> None:
        """Put the edge (and the hot path) in front of the framework, once every route is in
        place: the edge reads the routes' templates and scopes; the hot path refuses
        (HotPathMismatch) when a hot route's dependencies differ from what it implements."""
        if hot_path:
            hot = HotPath(super().__call__, self)
            self._entry = self._layers(hot, hot.parses_strictly)
        else:
            self._entry = self._layers(super().__call__, frozenset())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)


def create_app(settings: Settings | None = None, *, hot_path: bool = True) -> FastAPI:
    """The service. `hot_path=False` sends every request through the framework (the tests
    compare the two)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        statements = await StatementPool.open(
            engine,
            settings.db_pool_size,
            session_settings(settings),
            connect_timeout=settings.db_connect_timeout_seconds,
        )
        # HOT_PATH_LANES statements of each hot kind in flight per worker (lanes.py).
        lanes = min(settings.hot_path_lanes, settings.db_pool_size)
        # Stored once per installation: every worker, instance and restart gets the same.
        installation = await load_installation_secrets(engine, settings)

        # The sandbox's webhooks enter through the same inbox as Stripe's (local_delivery.py).
        deliver = to_inbox(engine, lambda: state.provider, settings.jobs_poll_seconds)
        provider = get_payment_provider(settings, engine, installation, deliver)
        shared, key_limits, account_limits = rate_limits(settings)
        if shared is not None:
            await shared.warm_up()
        state = AppState(
            settings=settings,
            engine=engine,
            account_reader=AccountReader(statements, lanes),
            charge_store=ChargeStore(
                statements, lanes, monthly=settings.free_uses_reset == "monthly"
            ),
            hold_store=HoldStore(statements, lanes, monthly=settings.free_uses_reset == "monthly"),
            capture_store=CaptureStore(statements, lanes),
            pricing=Pricing.from_settings(settings),
            keys=KeyStore(engine, settings.api_key_cache_seconds),
            provider=provider,
            link_secret=installation.checkout_link_secret,
            key_limits=key_limits,
            account_limits=account_limits,
            secrets=installation,
            console_logins=login_failures(settings, shared),
            rate_book=RateBook(engine, settings.rates_refresh_seconds),
        )
        app.state.billing = state
        log.info("billing_started", version=__version__, database=engine.dialect.name)
        announce_provider(provider.name)
        # Everything alive now (modules, the app, its routes and models) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks it. Measured
        # at 64 connections: charge p99 110 -> 39 ms (those collections were the tail).
        gc.freeze()
        try:
            # The sandbox's test clock, kept in step with the database's (clock.py).
            async with test_clock.following(engine, settings):
                if settings.jobs_enabled:
                    # Retries and reconcile in the background, once across all workers (jobs.py).
                    async with running_jobs(settings, engine, provider):
                        yield
                else:
                    yield
        finally:
            gc.unfreeze()
            if shared is not None:
                await shared.close()
            await provider.aclose()
            await statements.close()
            await engine.dispose()

    app = BillingApp(
        max_request_bytes=settings.max_request_bytes,
        access_log=settings.access_log,
        title="CIRIS Billing API",
        version=__version__,
        description="Free uses, paid uses and purchases for AI-agent products.",
        lifespan=lifespan,
        # web/docs.py serves them, with assets of its own (no CDN) and security headers.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        # Any route: a body over MAX_REQUEST_BYTES, or the database unreachable.
        responses=error_responses(413, 503),
        generate_unique_id_function=openapi.operation_id,  # createCharge, not its path
    )
    app.include_router(accounts_router)
    app.include_router(reservations_router)
    app.include_router(admin_router)
    app.include_router(lots_router)
    app.include_router(reports_router)
    app.include_router(catalog_router)
    app.include_router(rates_router)
    app.include_router(console_rates_router)
    app.include_router(auto_topup_router)
    app.include_router(payments_router)
    app.include_router(sandbox_router)
    app.include_router(test_clock_router)
    app.include_router(webhooks_router)
    app.include_router(webhook_endpoints_router)
    app.include_router(checkout_router)
    app.include_router(portal_router)
    app.include_router(portal_links_router)
    app.include_router(console_router)
    app.include_router(console_actions_router)
    app.include_router(console_reports_router)
    app.include_router(console_catalog_router)
    app.include_router(docs_router)
    _add_operational_routes(app)
    _add_error_handlers(app)
    openapi.install(app)
    app.serve_edge(hot_path)
    return app


def rate_limits(settings: Settings) -> tuple[SharedStore | None, Limiter, Limiter]:
    """The per-key and per-account limits: shared through Redis with REDIS_URL, else per
    process (ratelimit.py). Returns the shared store too (to be closed), or None."""
    key_rate = settings.rate_limit_key_per_second
    account_rate = settings.rate_limit_account_per_minute / 60
    account_burst = settings.rate_limit_account_per_minute / 6
    if settings.redis_url is None:
        log.info("rate_limits", store="process")
        return (
            None,
            TokenBuckets(key_rate, 2 * key_rate),
            TokenBuckets(account_rate, account_burst),
        )
    shared = SharedStore.open(settings.redis_url.get_secret_value())
    log.info("rate_limits", store="redis")
    return (
        shared,
        SharedBuckets(shared, "key", key_rate, 2 * key_rate),
        SharedBuckets(shared, "account", account_rate, account_burst, hashed=True),
    )


def login_failures(settings: Settings, shared: SharedStore | None) -> FailureLimit:
    """Failed console sign-ins per client address: in Redis with REDIS_URL (every worker and
    instance count together), else per process."""
    rate = settings.console_login_failures_per_minute / 60
    burst = settings.console_login_failures_per_minute
    if shared is None:
        return FailureLimit(TokenBuckets(rate, burst))
    # Addresses are personal data: Redis sees only their digest.
    return FailureLimit(SharedBuckets(shared, "console_login", rate, burst, hashed=True))


def announce_provider(name: str) -> None:
    """Say loudly which payment provider is active."""
    if name == "sandbox":
        log.warning(
            "payment_provider_active",
            provider="sandbox",
            message="SANDBOX payments: test cards only, no real money moves",
        )
    else:
        log.info("payment_provider_active", provider=name)


def _add_operational_routes(app: FastAPI) -> None:
    @app.get(
        "/health",
        tags=["operations"],
        responses={503: {"description": "The database is unreachable"}},
    )
    async def health(state: StateDep) -> Response:
        """Liveness and database reachability (no API key needed): 503 while the database
        cannot be reached within HEALTH_TIMEOUT_SECONDS, or answers read-only (a standby, or a
        primary a failover demoted: no write would succeed there)."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_SECONDS), state.engine.connect() as conn:
                read_only = await conn.scalar(
                    text("SELECT current_setting('transaction_read_only')")
                )
                if read_only == "on":
                    await conn.invalidate()  # not back to the pool: no write would work on it
        except (DBAPIError, OSError, PoolTimeout, asyncpg.InterfaceError, TimeoutError):
            return json_response(
                503, {"status": "unavailable", "database": "unreachable"}, {"Retry-After": "1"}
            )
        if read_only == "on":
            return json_response(
                503, {"status": "unavailable", "database": "read_only"}, {"Retry-After": "1"}
            )
        return json_response(200, {"status": "ok", "database": "ok", "version": __version__})

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    async def metrics(
        state: StateDep,
        api_key: Annotated[str | None, Security(API_KEY_HEADER)],
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)],
    ) -> Response:
        """Prometheus exposition, for METRICS_TOKEN as a bearer token (Prometheus'
        `authorization`) or a read key (its figures, purchases included, are not public)."""
        presented = chosen_key(api_key, bearer)
        token = state.settings.metrics_token
        if token is None or presented is None or not same_secret(presented, token):
            await authorize_key(state, presented, "read")
        payload, content_type = metrics_payload()
        return Response(content=payload, media_type=content_type)


def _add_error_handlers(app: FastAPI) -> None:
    async def rendered(_request: Request, exc: Exception) -> Response:
        # The one renderer, shared with the fast path; registered only for what it answers.
        response = error_response(exc)
        if response is None:
            raise exc
        return response

    for handled in RENDERED:
        app.add_exception_handler(handled, rendered)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> Response:
        problems = [_describe(error) for error in exc.errors()]
        return json_response(
            422,
            {
                "error": "validation_error",
                "detail": "; ".join(p["message"] for p in problems) or "Invalid request",
                "errors": problems,
            },
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer to a body that is not UTF-8: bad input, a 422 like any other.
            return json_response(
                422,
                {"error": "validation_error", "detail": "The request body is not valid JSON"},
            )
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "http_error"
        )
        return json_response(exc.status_code, {"error": code, "detail": str(exc.detail)})


def _describe(error: Any) -> dict[str, Any]:
    """A validation problem without echoing the input back (it may hold secrets)."""
    location = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
    message = str(error.get("msg", "invalid"))
    if not location and error.get("type") in ("model_attributes_type", "dict_type", "missing"):
        message = "The request body must be a JSON object (send Content-Type: application/json)"
    return {
        "field": location,
        "message": f"{location}: {message}" if location else message,
        "type": error.get("type"),
    }
