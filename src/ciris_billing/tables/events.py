"""The transactional outbox and webhook endpoints and deliveries (events/)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from ciris_billing.tables.base import (
    Id,
    Timestamp,
    metadata,
)

# The transactional outbox (events/outbox.py): one row per event, written in the transaction of
# the change it reports; delivered to webhook endpoints by the job queue (events/delivery.py).
events = Table(
    "events",
    metadata,
    Column("id", Id, primary_key=True),
    # NULL for events about no account (endpoint.disabled).
    Column("account_id", Id, ForeignKey("accounts.id")),
    # The account's event_sequence taken for this event: unique per account, so consumers can
    # order an account's events and see a gap.
    Column("sequence", BigInteger),
    Column("type", String(64), nullable=False),
    # The delivered body's `data`, complete (account identity and sequence included).
    Column("data", JSON, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    # Set once the event has been fanned out to the endpoints (a delivery row each).
    Column("dispatched_at", Timestamp),
    UniqueConstraint("account_id", "sequence"),
    CheckConstraint("(account_id IS NULL) = (sequence IS NULL)", name="sequence_with_account"),
    # The dispatcher's scan: only events not yet fanned out.
    Index(
        "ix_events_undispatched_created_at",
        "created_at",
        postgresql_where=text("dispatched_at IS NULL"),
    ),
    Index(None, "created_at"),
)

ENDPOINT_STATUSES = ("enabled", "disabled")

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", Id, primary_key=True),
    Column("url", String(2048), nullable=False),
    Column("description", String(500)),
    # The event types it receives; NULL: all.
    Column("events", JSON(none_as_null=True)),
    # The signing secret (whsec_ + base64): needed to sign, so kept as is; never logged.
    Column("secret", Text, nullable=False),
    # After a rotation the old secret keeps signing beside the new one until this time.
    Column("previous_secret", Text),
    Column("previous_secret_expires_at", Timestamp),
    Column("status", String(16), nullable=False),
    Column("disabled_reason", String(200)),
    # The first failed attempt of the current run of failures (NULL after a success): three
    # days of failures in a row disable the endpoint.
    Column("failing_since", Timestamp),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in ENDPOINT_STATUSES) + ")",
        name="status_known",
    ),
)

DELIVERY_STATUSES = ("pending", "delivered", "failed")

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", Id, primary_key=True),
    Column(
        "endpoint_id", Id, ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False
    ),
    Column("event_id", Id, ForeignKey("events.id"), nullable=False),
    # pending -> delivered (a 2xx) | failed (retries over: RETRY window passed); resend: pending
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", Timestamp, nullable=False),
    Column("last_attempt_at", Timestamp),
    Column("last_status_code", Integer),
    Column("last_error", String(200)),
    Column("delivered_at", Timestamp),
    Column("created_at", Timestamp, nullable=False),
    # One delivery per (endpoint, event), however often the dispatcher runs.
    UniqueConstraint("endpoint_id", "event_id"),
    CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in DELIVERY_STATUSES) + ")",
        name="status_known",
    ),
    # The delivery job's scan: an endpoint's pending deliveries by due time.
    Index(
        "ix_webhook_deliveries_pending",
        "endpoint_id",
        "next_attempt_at",
        postgresql_where=text("status = 'pending'"),
    ),
    Index(None, "endpoint_id", "created_at"),
    Index(None, "event_id"),
)
