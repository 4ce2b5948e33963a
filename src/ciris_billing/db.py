"""Database: the schema (its tables live in ciris_billing.tables, re-exported here), the engine,
and statement helpers.

The ledger's invariants live here, in the database, so that no code path can break them:
CHECK constraints keep every counter at zero or above, unique constraints make identities,
idempotency keys and external transaction ids impossible to record twice.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Table,
    event,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ciris_billing import clock
from ciris_billing.config import Settings, async_database_url
from ciris_billing.database_errors import is_read_only, opened_read_only
from ciris_billing.tables.autotopup import AUTO_TOPUP_IN_FLIGHT as AUTO_TOPUP_IN_FLIGHT
from ciris_billing.tables.autotopup import AUTO_TOPUP_STATUSES as AUTO_TOPUP_STATUSES
from ciris_billing.tables.autotopup import auto_topup_settings as auto_topup_settings
from ciris_billing.tables.autotopup import auto_topups as auto_topups
from ciris_billing.tables.autotopup import payment_customers as payment_customers
from ciris_billing.tables.base import ACCOUNTS_FILLFACTOR as ACCOUNTS_FILLFACTOR
from ciris_billing.tables.base import Id as Id
from ciris_billing.tables.base import LotIds as LotIds
from ciris_billing.tables.base import LotKinds as LotKinds
from ciris_billing.tables.base import LotUses as LotUses
from ciris_billing.tables.base import Minor as Minor
from ciris_billing.tables.base import Timestamp as Timestamp
from ciris_billing.tables.base import Uses as Uses
from ciris_billing.tables.base import metadata as metadata
from ciris_billing.tables.catalog import packs as packs
from ciris_billing.tables.catalog import plans as plans
from ciris_billing.tables.catalog import promotion_codes as promotion_codes
from ciris_billing.tables.catalog import promotion_redemptions as promotion_redemptions
from ciris_billing.tables.events import DELIVERY_STATUSES as DELIVERY_STATUSES
from ciris_billing.tables.events import ENDPOINT_STATUSES as ENDPOINT_STATUSES
from ciris_billing.tables.events import events as events
from ciris_billing.tables.events import webhook_deliveries as webhook_deliveries
from ciris_billing.tables.events import webhook_endpoints as webhook_endpoints
from ciris_billing.tables.keys import LEGACY_SCOPE as LEGACY_SCOPE
from ciris_billing.tables.keys import api_keys as api_keys
from ciris_billing.tables.keys import idempotency_keys as idempotency_keys
from ciris_billing.tables.ledger import CREDIT_KINDS as CREDIT_KINDS
from ciris_billing.tables.ledger import LOT_STATUSES as LOT_STATUSES
from ciris_billing.tables.ledger import RESERVATION_STATUSES as RESERVATION_STATUSES
from ciris_billing.tables.ledger import accounts as accounts
from ciris_billing.tables.ledger import charges as charges
from ciris_billing.tables.ledger import credits as credits
from ciris_billing.tables.ledger import lots as lots
from ciris_billing.tables.ledger import reservations as reservations
from ciris_billing.tables.operations import audit_trail as audit_trail
from ciris_billing.tables.operations import console_sessions as console_sessions
from ciris_billing.tables.operations import installation_secrets as installation_secrets
from ciris_billing.tables.operations import portal_link_revocations as portal_link_revocations
from ciris_billing.tables.operations import test_clock as test_clock
from ciris_billing.tables.payments import DISPUTE_STATES as DISPUTE_STATES
from ciris_billing.tables.payments import PURCHASE_STATUSES as PURCHASE_STATUSES
from ciris_billing.tables.payments import disputes as disputes
from ciris_billing.tables.payments import purchases as purchases
from ciris_billing.tables.payments import webhook_events as webhook_events
from ciris_billing.tables.rates import RATE_ROUNDINGS as RATE_ROUNDINGS
from ciris_billing.tables.rates import rates as rates
from ciris_billing.tables.reports import revenue_days as revenue_days
from ciris_billing.tables.reports import revenue_lot_states as revenue_lot_states
from ciris_billing.tables.reports import revenue_rollup as revenue_rollup
from ciris_billing.tables.reports import usage_active as usage_active
from ciris_billing.tables.reports import usage_days as usage_days
from ciris_billing.tables.sandbox import SANDBOX_CARD_BEHAVIOURS as SANDBOX_CARD_BEHAVIOURS
from ciris_billing.tables.sandbox import sandbox_customers as sandbox_customers
from ciris_billing.tables.sandbox import sandbox_disputes as sandbox_disputes
from ciris_billing.tables.sandbox import sandbox_payment_methods as sandbox_payment_methods
from ciris_billing.tables.sandbox import sandbox_payments as sandbox_payments
from ciris_billing.tables.sandbox import sandbox_webhook_events as sandbox_webhook_events

# The installation's time (clock.py): the real UTC time plus the sandbox's test-clock offset.
utcnow = clock.now


def iso(value: datetime | str) -> str:
    """A timestamp (or its ISO text) as ISO 8601 in UTC; a naive one is taken as UTC."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.isoformat()


def new_id(prefix: str) -> str:
    """A public id such as `ch_3f9a...`: random, so ids never collide across processes."""
    return f"{prefix}_{secrets.token_hex(12)}"


def insert_or_ignore(table: Table) -> Any:
    """`INSERT ... ON CONFLICT DO NOTHING`.

    A conflicting insert waits for the other transaction and then does nothing, so a caller
    that sees no row inserted can read the committed winner.
    """
    return pg_insert(table).on_conflict_do_nothing()


def in_our_models(name: str | None, type_: str, _parent: object) -> bool:
    """For alembic's comparisons: the job queue's own tables (procrastinate's, jobs.py, made by
    migration 0007 from its release's schema) are not in these models."""
    return not (type_ == "table" and (name or "").startswith("procrastinate_"))


# Our settings that SQL reads (current_setting), sent when each connection opens: no statement
# carries them as parameters. (events/outbox.py THRESHOLD_SQL: the balance.low threshold.)
LOW_BALANCE_THRESHOLD_SETTING = "ciris_billing.low_balance_threshold_uses"


def session_settings(settings: Settings | None) -> dict[str, str]:
    """PostgreSQL settings for every connection the service opens (asyncpg server_settings)."""
    if settings is None:
        return {}
    return {LOW_BALANCE_THRESHOLD_SETTING: str(settings.low_balance_threshold_uses)}


def create_engine(settings: Settings | str) -> AsyncEngine:
    """The async engine, on `settings`' database (or a `postgresql://` URL)."""
    if isinstance(settings, str):
        async_url, pool_size = async_database_url(settings), 10
        server_settings = session_settings(None)
        connect_timeout = 5.0
    else:
        async_url, pool_size = settings.async_database_url, settings.db_pool_size
        server_settings = session_settings(settings)
        connect_timeout = settings.db_connect_timeout_seconds
    engine = create_async_engine(
        async_url,
        pool_size=pool_size,
        # Errors never carry the statement's parameters (webhook payloads, emails) into logs.
        hide_parameters=True,
        # No overflow: connections opened past the pool for a burst are closed again on
        # return, and under steady load that meant a new PostgreSQL backend (a fork and a
        # login) every few requests; measured, it halved throughput at 64 connections.
        max_overflow=0,
        # A database that stops answering (rather than refusing) must not hang requests for
        # minutes: connecting gives up after DB_CONNECT_TIMEOUT_SECONDS (5 s), any one statement
        # after 30 s (then 503).
        connect_args={
            "timeout": connect_timeout,
            "command_timeout": 30,
            "server_settings": server_settings,
        },
    )
    _replace_closed_connections(engine)
    _drop_unusable_connections(engine)
    return engine


def _drop_unusable_connections(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        # A read-only server where the primary was (a failover demoted it; SQLSTATE 25006) is
        # a disconnect to the pool, like a lost connection: this connection is closed, and the
        # pool's others are replaced as they are next checked out, so that new connections
        # reach the new primary. Lost connections SQLAlchemy recognises itself.
        if not context.is_disconnect and is_read_only(context.original_exception):
            context.is_disconnect = True


# Marks a pooled connection opened read-only that has served its one checkout (`record.info`
# lives as long as the driver's connection).
_USED_READ_ONLY = "ciris_billing.used_read_only"


def _replace_closed_connections(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # A pooled connection the server closed while it sat idle (a restart, a terminated
        # backend) is known closed by the driver already: the pool replaces it now, at no
        # round-trip cost, instead of handing it to a request that would fail with a 503.
        driver = record.driver_connection
        if driver.is_closed():
            raise DisconnectionError("connection closed while idle in the pool")
        # A connection opened while the server was read-only serves one checkout (a read works
        # there, and goes back to the pool without an error that would drop it); at its next
        # it is replaced, so the first write after the server is writable again gets a
        # writable session (tests/faults/test_faults_read_only.py).
        if opened_read_only(driver):
            if record.info.get(_USED_READ_ONLY):
                raise DisconnectionError("connection opened while the server was read-only")
            record.info[_USED_READ_ONLY] = True


# How long a request waits for a pooled connection before it is answered 503 (the engine's
# pool waits as long, then raises its TimeoutError).
POOL_TIMEOUT_SECONDS = 30
