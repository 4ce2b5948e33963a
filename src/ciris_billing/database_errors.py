"""Which database errors mean "this connection is no good: drop it, answer 503, retry".

A connection lost or refused, the server shutting down or starting, and, after a failover, a
connection that still reaches the old primary now demoted to a read-only standby (SQLSTATE 25006,
read_only_sql_transaction): none of these is the request's fault, and a retry soon succeeds on a
new connection (to the new primary). Shared by the SQLAlchemy engine (db.py), the hot path's
pool (accounts/hot/pool.py) and the error renderer (errors_http.py).
"""

from __future__ import annotations

import asyncpg
from sqlalchemy.exc import DBAPIError

# SQLSTATEs of a connection that is gone or useless: class 08 (connection exception); the
# server shutting down, crashed or not accepting connections yet (57P01, 57P02, 57P03); no
# connection slot left (53300 too_many_connections: max_connections, or a role's or a
# database's CONNECTION LIMIT); a read-only server where a primary was expected (25006: the
# node was demoted, or is a standby).
TOO_MANY_CONNECTIONS_SQLSTATE = "53300"
_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03", TOO_MANY_CONNECTIONS_SQLSTATE)
READ_ONLY_SQLSTATE = "25006"


def is_read_only(exc: BaseException) -> bool:
    """Whether this error (or one it came from) says the server is read-only."""
    return any(getattr(current, "sqlstate", None) == READ_ONLY_SQLSTATE for current in _chain(exc))


def opened_read_only(connection: asyncpg.Connection) -> bool:
    """Whether the server said this connection's session is read-only: a standby, or a server
    whose default is read-only (a demoted primary, as the fault tests play it). Read from what
    the server reports by itself (ParameterStatus, PostgreSQL 14+), no round trip. Such a
    session keeps refusing writes after the server is writable again, so the pools use it once
    and then replace it: reads still work on it, and no write would."""
    settings = connection.get_settings()
    return (
        getattr(settings, "default_transaction_read_only", "off") == "on"
        or getattr(settings, "in_hot_standby", "off") == "on"
    )


def too_many_connections(exc: BaseException) -> bool:
    """Whether this error (or one it came from) says the server has no connection slot left."""
    return any(
        getattr(current, "sqlstate", None) == TOO_MANY_CONNECTIONS_SQLSTATE
        for current in _chain(exc)
    )


def connection_unusable(exc: BaseException) -> bool:
    """Whether this error (or one it came from) says the connection is gone or points at a
    server that cannot take writes: drop the connection, and the request may be retried."""
    for current in _chain(exc):
        if isinstance(current, OSError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and (
            sqlstate.startswith(_CONNECTION_SQLSTATES) or sqlstate == READ_ONLY_SQLSTATE
        ):
            return True
        if isinstance(current, asyncpg.InterfaceError) and "connection is closed" in str(current):
            return True
        if isinstance(current, asyncpg.InternalClientError):
            # "cannot switch to state N; another operation is in progress" on a connection only
            # this request holds: the server's error (e.g. the connection terminated) arrived
            # first; the statement was not sent.
            return True
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """The error and those it came from (at most 10), nearest first."""
    found: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(found) < 10:
        found.append(current)
        current = current.__cause__ or current.__context__
    return found


def explained(exc: BaseException) -> str | None:
    """One line for an operator about a database error (the CLI's), or None if `exc` is not
    one. Names the error's type and SQLSTATE, never its message (it may carry values)."""
    if not isinstance(
        exc, (DBAPIError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
    ):
        return None
    if too_many_connections(exc):
        return (
            "the database refuses more connections (too many connections: max_connections or "
            "a role's or database's CONNECTION LIMIT reached); retry later"
        )
    if connection_unusable(exc):
        cause = _chain(exc)[-1]
        return (
            f"cannot reach the database ({type(cause).__name__}); is it running, and is "
            "DATABASE_URL right? Retry when it is back"
        )
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    sqlstate = next(
        (getattr(c, "sqlstate", None) for c in _chain(exc) if getattr(c, "sqlstate", None)), None
    )
    return (
        f"the database refused the command ({type(cause).__name__}, SQLSTATE {sqlstate or '?'}); "
        "if the schema is old, run `ciris-billing migrate`"
    )
