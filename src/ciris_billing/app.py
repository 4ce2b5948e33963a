"""create_app(): settings, lifespan (database, keys), routers, and the one error shape."""

from __future__ import annotations

import gc
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ciris_billing import __version__
from ciris_billing.accounts.account_reader import AccountReader
from ciris_billing.accounts.admin_routes import router as admin_router
from ciris_billing.accounts.charge_writer import ChargeWriter
from ciris_billing.accounts.routes import router as accounts_router
from ciris_billing.accounts.schemas import error_responses
from ciris_billing.auth import KeyStore
from ciris_billing.checkout.routes import router as checkout_router
from ciris_billing.config import Settings, get_settings
from ciris_billing.db import StatementPool, create_engine
from ciris_billing.deps import AppState, StateDep, json_response
from ciris_billing.errors import BillingError
from ciris_billing.hotpath import HotPath
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
from ciris_billing.pricing import Pricing
from ciris_billing.ratelimit import TokenBuckets
from ciris_billing.webhooks import inbox
from ciris_billing.webhooks.routes import router as webhooks_router

# Statements of each hot kind (check, charge) in flight at once per worker; requests beyond
# wait and go out batched (lanes.py). Measured for charges at 64 connections: 2, 4 and 10
# lanes gave the same throughput, 4 the lowest p99 at 8 connections.
LANES = 4


class BillingApp(FastAPI):
    """FastAPI, entered through the service's own ASGI layers: request ids and the latency
    metric, the body-size limit, then the hot path (hotpath.py) ahead of the framework's own
    middleware and routing. As plain ASGI layers around the app rather than middleware inside
    it, they spare the two hot routes the framework's per-request layers (profiled: a tenth of
    a credit check's CPU). Lifespan and everything else pass straight through them."""

    def __init__(self, *, max_request_bytes: int, hot_path: bool, **options: Any) -> None:
        super().__init__(**options)
        framework: ASGIApp = super().__call__
        inner = HotPath(framework, self) if hot_path else framework
        self._entry = RequestContextMiddleware(BodySizeLimitMiddleware(inner, max_request_bytes))

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
        statements = await StatementPool.open(engine, settings.db_pool_size)
        lanes = min(LANES, settings.db_pool_size)

        async def deliver(payload: bytes, signature: str) -> None:
            # The sandbox's webhooks enter through the same inbox as Stripe's.
            await inbox.receive(engine, state.provider, payload, signature)

        provider = get_payment_provider(settings, engine, deliver)
        state = AppState(
            settings=settings,
            engine=engine,
            account_reader=None if statements is None else AccountReader(statements, lanes),
            charge_writer=None if statements is None else ChargeWriter(statements, lanes),
            pricing=Pricing.from_settings(settings),
            keys=KeyStore(engine, settings.api_key_cache_seconds),
            provider=provider,
            link_secret=(
                settings.checkout_link_secret.get_secret_value().encode()
                if settings.checkout_link_secret
                else secrets.token_bytes(32)
            ),
            key_limits=TokenBuckets(
                settings.rate_limit_key_per_second, 2 * settings.rate_limit_key_per_second
            ),
            account_limits=TokenBuckets(
                settings.rate_limit_account_per_minute / 60,
                settings.rate_limit_account_per_minute / 6,
            ),
        )
        app.state.billing = state
        log.info("billing_started", version=__version__, database=engine.dialect.name)
        announce_provider(provider.name)
        # Everything alive now (modules, the app, its routes and models) lives as long as the
        # process: out of the collector's sight, a full collection no longer walks it. Measured
        # at 64 connections: charge p99 110 -> 39 ms (those collections were the tail).
        gc.freeze()
        try:
            yield
        finally:
            gc.unfreeze()
            await provider.aclose()
            if statements is not None:
                await statements.close()
            await engine.dispose()

    app = BillingApp(
        max_request_bytes=settings.max_request_bytes,
        hot_path=hot_path,
        title="CIRIS Billing API",
        version=__version__,
        description="Free uses, paid uses and purchases for AI-agent products.",
        lifespan=lifespan,
        # Any route: a body over MAX_REQUEST_BYTES, or the database unreachable.
        responses=error_responses(413, 503),
    )
    app.include_router(accounts_router)
    app.include_router(admin_router)
    app.include_router(payments_router)
    app.include_router(sandbox_router)
    app.include_router(webhooks_router)
    app.include_router(checkout_router)
    _add_operational_routes(app)
    _add_error_handlers(app)
    return app


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
        """Liveness and database reachability (no API key needed)."""
        try:
            async with state.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (DBAPIError, OSError, PoolTimeout, asyncpg.InterfaceError):
            return json_response(503, {"status": "unavailable", "database": "unreachable"})
        return json_response(200, {"status": "ok", "database": "ok", "version": __version__})

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    async def metrics() -> Response:
        """Prometheus exposition."""
        payload, content_type = metrics_payload()
        return Response(content=payload, media_type=content_type)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BillingError)
    async def billing_error(_request: Request, exc: BillingError) -> Response:
        retry_after = exc.extra.get("retry_after_seconds")
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return json_response(exc.status_code, exc.body(), headers)

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

    # A connection lost or refused (also while the pool opens one, where the driver's error may
    # arrive unwrapped) and a pool with no connection to give are "unavailable: retry" (503);
    # any other database error is a bug (500).
    @app.exception_handler(DBAPIError)
    @app.exception_handler(asyncpg.InterfaceError)
    @app.exception_handler(asyncpg.PostgresError)  # the hot paths use the driver directly
    @app.exception_handler(asyncpg.InternalClientError)
    @app.exception_handler(PoolTimeout)
    async def database_error(_request: Request, exc: Exception) -> Response:
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        if isinstance(exc, PoolTimeout) or _connection_lost(exc):
            log.warning("database_unavailable", error_type=type(cause).__name__)
            return json_response(
                503,
                {"error": "database_unavailable", "detail": "The database is unreachable; retry"},
            )
        log.error("database_error", error_type=type(cause).__name__, exc_info=exc)
        return json_response(500, {"error": "internal_error", "detail": "Internal error"})

    @app.exception_handler(OSError)
    async def connection_error(_request: Request, exc: OSError) -> Response:
        log.warning("database_unavailable", error_type=type(exc).__name__)
        return json_response(
            503, {"error": "database_unavailable", "detail": "The database is unreachable; retry"}
        )


# SQLSTATEs of a lost connection: class 08 (connection exception), and the server shutting
# down, crashed or not accepting connections yet (57P01, 57P02, 57P03).
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03")


def _connection_lost(exc: BaseException) -> bool:
    """Whether this error (or one it came from) says the database connection is gone."""
    current: BaseException | None = exc
    for _ in range(10):
        if current is None:
            return False
        if isinstance(current, OSError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith(_CONNECTION_SQLSTATES):
            return True
        if isinstance(current, asyncpg.InterfaceError) and "connection is closed" in str(current):
            return True
        if isinstance(current, asyncpg.InternalClientError):
            # "cannot switch to state N; another operation is in progress" on a connection only
            # this request holds: the server's error (e.g. the connection terminated) arrived
            # first; the statement was not sent.
            return True
        current = current.__cause__ or current.__context__
    return False


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
