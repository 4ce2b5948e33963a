"""The sandbox payment provider's own tables (payments/providers/sandbox.py)."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    text,
)

from ciris_billing.tables.base import (
    Minor,
    Timestamp,
    metadata,
)

sandbox_payments = Table(
    "sandbox_payments",
    metadata,
    # The built-in sandbox provider's own state (it plays Stripe in test mode). In the
    # database so that every worker, and the CLI's reconcile, see the same payments.
    Column("id", String(64), primary_key=True),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("amount_minor", Minor, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(32), nullable=False),
    Column("client_secret", String(128), nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("failure_message", String(500)),
    Column("amount_refunded_minor", Minor, nullable=False),
    # What a receipt shows of the card that paid (as Stripe reports it): never the number.
    Column("card_brand", String(32)),
    Column("card_last4", String(4)),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # Saved cards: the customer paying, whether to keep its card (setup_future_usage), the
    # card it was paid with once kept, and whether its owner was away (off_session).
    Column("customer_id", String(64)),
    Column("save_card", Boolean, nullable=False, server_default=text("false")),
    Column("payment_method_id", String(64)),
    Column("off_session", Boolean, nullable=False, server_default=text("false")),
    CheckConstraint(
        "amount_refunded_minor >= 0 AND amount_refunded_minor <= amount_minor",
        name="refund_within_amount",
    ),
    Index(None, "customer_id"),
)

sandbox_customers = Table(
    "sandbox_customers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("account_id", String(40), nullable=False),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    Column("created_at", Timestamp, nullable=False),
)

SANDBOX_CARD_BEHAVIOURS = ("succeeds", "declined", "authentication_required")

sandbox_payment_methods = Table(
    "sandbox_payment_methods",
    metadata,
    # The sandbox's saved cards. What the card does when charged (the test card it was made
    # from), its brand and last 4 digits: never the card number.
    Column("id", String(64), primary_key=True),
    Column("customer_id", String(64), ForeignKey("sandbox_customers.id"), nullable=False),
    Column("brand", String(32), nullable=False),
    Column("last4", String(4), nullable=False),
    Column("behaviour", String(32), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    # Set when the card is attached to its customer (its payment succeeded); NULL: it was
    # never kept, or it was detached. Only an attached card can be charged off-session.
    Column("attached_at", Timestamp),
    CheckConstraint(
        "behaviour IN (" + ", ".join(f"'{s}'" for s in SANDBOX_CARD_BEHAVIOURS) + ")",
        name="behaviour_known",
    ),
)

sandbox_disputes = Table(
    "sandbox_disputes",
    metadata,
    # The sandbox's disputes (the bank's side), opened and closed only by an admin through
    # the sandbox endpoints: what the inbox asks about, never what an event body claims.
    Column("id", String(64), primary_key=True),
    Column("payment_id", String(64), ForeignKey("sandbox_payments.id"), nullable=False),
    Column("status", String(32), nullable=False),  # Stripe's dispute statuses
    Column("amount_minor", Minor, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # One dispute per payment, as the sandbox has always modelled it.
    UniqueConstraint("payment_id"),
)

sandbox_webhook_events = Table(
    "sandbox_webhook_events",
    metadata,
    # The sandbox's webhooks not yet acknowledged (Stripe's side): written with the payment's
    # change in one transaction, sent, and sent again with backoff until a 2xx answer, so a
    # worker killed after a payment succeeded no longer loses its webhook.
    Column("id", String(64), primary_key=True),  # the event id (evt_sbx_...)
    Column("type", String(64), nullable=False),
    Column("payment_id", String(64), ForeignKey("sandbox_payments.id"), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Timestamp, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("delivered_at", Timestamp),
    Index(
        "ix_sandbox_webhook_events_due",
        "next_attempt_at",
        postgresql_where=text("delivered_at IS NULL"),
    ),
)
