"""Auto top-up (autotopup/): saved payment customers, settings and top-ups."""

from __future__ import annotations

from sqlalchemy import (
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
    Id,
    Timestamp,
    metadata,
)

# --- auto top-up (autotopup/) ----------------------------------------------------------------

payment_customers = Table(
    "payment_customers",
    metadata,
    # The provider's customer for one of our accounts (the owner of its saved cards).
    Column("account_id", Id, ForeignKey("accounts.id"), primary_key=True),
    Column("provider", String(32), primary_key=True),
    Column("customer_id", String(255), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    UniqueConstraint("provider", "customer_id"),
)

auto_topup_settings = Table(
    "auto_topup_settings",
    metadata,
    # One row per account that ever saved a card for auto top-up. Only the provider's ids and
    # what may be shown (brand, last 4 digits) are kept: never card data.
    Column("account_id", Id, ForeignKey("accounts.id"), primary_key=True),
    Column("provider", String(32), nullable=False),
    Column("customer_id", String(255), nullable=False),
    Column("payment_method_id", String(255)),
    Column("card_brand", String(32)),
    Column("card_last4", String(4)),
    Column("enabled", Boolean, nullable=False),
    # When it was last switched on: only balance crossings after it ask for a top-up.
    Column("enabled_at", Timestamp),
    # Declined (or otherwise failed) top-ups in a row; at AUTO_TOPUP_MAX_FAILURES it is off.
    Column("consecutive_failures", Integer, nullable=False, server_default=text("0")),
    Column("disabled_reason", String(200)),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # Switched on only with a card to charge; removing the card switches it off.
    CheckConstraint("NOT enabled OR payment_method_id IS NOT NULL", name="card_when_enabled"),
    CheckConstraint("consecutive_failures >= 0", name="failures_not_negative"),
)

# pending: decided, not paid yet (the provider may or may not have been asked);
# processing: the provider took the payment, its webhook credits it; the rest are final.
AUTO_TOPUP_IN_FLIGHT = ("pending", "processing")
AUTO_TOPUP_STATUSES = (*AUTO_TOPUP_IN_FLIGHT, "succeeded", "failed", "requires_action", "skipped")

auto_topups = Table(
    "auto_topups",
    metadata,
    Column("id", Id, primary_key=True),
    Column("account_id", Id, ForeignKey("accounts.id"), nullable=False),
    # The balance.low event (the crossing) that asked for it: unique, one top-up per crossing.
    Column("crossing_event_id", String(40), nullable=False, unique=True),
    Column("status", String(24), nullable=False),
    # The purchase it pays (a purchase like any other: credited by the webhook path only).
    Column("purchase_id", Id, nullable=False, unique=True),
    Column("payment_id", String(255)),
    Column("idempotency_key", String(255), nullable=False, unique=True),
    # Calls made to the provider; above 1, a lost answer is looked for before paying again.
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_attempt_at", Timestamp),
    Column("reason", String(64)),  # why it failed or was skipped (a code)
    Column("failure_message", String(500)),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in AUTO_TOPUP_STATUSES) + ")",
        name="status_known",
    ),
    CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    # At most one top-up in flight per account, by construction: a second INSERT conflicts.
    Index(
        "uq_auto_topups_in_flight",
        "account_id",
        unique=True,
        postgresql_where=text(
            "status IN (" + ", ".join(f"'{s}'" for s in AUTO_TOPUP_IN_FLIGHT) + ")"
        ),
    ),
    Index(None, "account_id", "created_at"),
)
