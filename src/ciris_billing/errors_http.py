"""Errors as HTTP answers: the one renderer the app's exception handlers and the fast path share.

`error_response(exc)` is the service's answer to an exception raised while serving a request,
or None for an exception no handler answers (the server then answers 500, as from inside the
framework). app.py registers a handler for each class in RENDERED; the fast path
(accounts/hot/asgi.py) calls the same function, so both render every error identically.
"""

from __future__ import annotations

import asyncpg
from fastapi.responses import Response
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ciris_billing.auth import WWW_AUTHENTICATE
from ciris_billing.database_errors import connection_unusable
from ciris_billing.deps import json_response
from ciris_billing.errors import AuthenticationRequired, BillingError
from ciris_billing.observability import log

# A connection lost or refused (also while the pool opens one, where the driver's error may
# arrive unwrapped), a read-only server (a demoted primary, database_errors.py) and a pool with
# no connection to give are "unavailable: retry" (503 + Retry-After); any other database error
# is a bug (500). The hot paths use the driver directly.
DATABASE_ERRORS: tuple[type[Exception], ...] = (
    DBAPIError,
    asyncpg.InterfaceError,
    asyncpg.PostgresError,
    asyncpg.InternalClientError,
    PoolTimeout,
)
# What error_response answers (OSError: a connection refused or timed out, TimeoutError too).
RENDERED: tuple[type[Exception], ...] = (BillingError, *DATABASE_ERRORS, OSError)


def error_response(exc: Exception) -> Response | None:
    """The answer to `exc`: its own status and the one error shape; None if it is a bug."""
    if isinstance(exc, BillingError):
        retry_after = exc.extra.get("retry_after_seconds")
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        if isinstance(exc, AuthenticationRequired):
            headers["WWW-Authenticate"] = WWW_AUTHENTICATE
        return json_response(exc.status_code, exc.body(), headers or None)
    if isinstance(exc, DATABASE_ERRORS):
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        if isinstance(exc, PoolTimeout) or connection_unusable(exc):
            return _unavailable(cause)
        # exc_info is rendered without messages (observability.safe_traceback): a database
        # error's message and detail carry the statement's values.
        log.error("database_error", error_type=type(cause).__name__, exc_info=exc)
        return json_response(500, {"error": "internal_error", "detail": "Internal error"})
    if isinstance(exc, OSError):
        return _unavailable(exc)
    return None


# A failover (the new primary promoted, the proxy pointing at it) takes seconds: a client that
# retries after this finds it, one that retries at once mostly meets the outage again.
RETRY_AFTER_SECONDS = 1


def _unavailable(cause: BaseException | None) -> Response:
    log.warning("database_unavailable", error_type=type(cause).__name__)
    return json_response(
        503,
        {"error": "database_unavailable", "detail": "The database is unreachable; retry"},
        {"Retry-After": str(RETRY_AFTER_SECONDS)},
    )
