"""Purchases, disputes and the providers' webhook events."""

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
    Text,
    UniqueConstraint,
    text,
)

from ciris_billing.tables.base import (
    Id,
    Minor,
    Timestamp,
    Uses,
    metadata,
)

# Our own words (payments.providers.base.PaymentState, plus the refund states); each provider
# maps its statuses to them. The API shows `pending` as the guide's `requires_payment_method`.
PURCHASE_STATUSES = (
    "pending",
    "requires_action",
    "processing",
    "succeeded",
    "failed",
    "canceled",
    "partially_refunded",
    "refunded",
)

purchases = Table(
    "purchases",
    metadata,
    Column("id", Id, primary_key=True),
    Column("account_id", Id, ForeignKey("accounts.id"), nullable=False),
    Column("provider", String(32), nullable=False),
    Column("payment_id", String(255), nullable=False),
    Column("amount_minor", Minor, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("uses", Uses, nullable=False),
    Column("status", String(32), nullable=False),
    # Cumulative, as the provider reports it: a refund is applied by moving this forward,
    # under the purchase's row lock, so each refunded amount is taken back once.
    Column("refunded_minor", Minor, nullable=False, server_default=text("0")),
    Column("uses_refunded", Uses, nullable=False, server_default=text("0")),
    Column("customer_email", String(320)),
    Column("failure_message", String(500)),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("credited_at", Timestamp),
    # When the background reconcile (jobs.py) last asked the provider about this purchase:
    # it asks again with a backoff that grows with the purchase's age.
    Column("reconciled_at", Timestamp),
    # The payer asked (payment page) to keep the card for auto top-up: once paid, the card the
    # provider saved becomes the account's auto top-up card (autotopup/cards.py).
    Column("save_card", Boolean, nullable=False, server_default=text("false")),
    # When the payer's page (or the agent client) asked us to confirm a payment the provider
    # told it had succeeded: the background reconcile asks about it at once, not after
    # RECONCILE_AFTER_SECONDS (issue 22: a paying customer waited 3 minutes after a fault).
    Column("paid_seen_at", Timestamp),
    # The catalog (issue 24): the pack bought ("default": the environment's), the promotion
    # code that discounted it, and the pack's lot expiry as it was when the purchase began (so
    # a pack changed or archived meanwhile never changes a purchase in flight).
    Column("pack_id", String(64)),
    Column("promotion_code", String(64)),
    Column("lot_expires_in_days", Integer),
    # What the promotion code took off the pack's price (amount_minor is what is charged).
    Column("discount_minor", Minor, nullable=False, server_default=text("0")),
    # One purchase per provider payment: a retried create finds the row instead of adding one.
    UniqueConstraint("provider", "payment_id"),
    # 0 only for a purchase a promotion code made free (provider "promotion": no payment).
    CheckConstraint(
        "amount_minor > 0 OR (amount_minor = 0 AND provider = 'promotion')",
        name="amount_positive",
    ),
    CheckConstraint("uses > 0", name="uses_positive"),
    CheckConstraint(
        "refunded_minor >= 0 AND refunded_minor <= amount_minor", name="refund_within_amount"
    ),
    CheckConstraint("uses_refunded >= 0 AND uses_refunded <= uses", name="uses_refunded_within"),
    CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in PURCHASE_STATUSES) + ")",
        name="status_known",
    ),
    Index(None, "account_id", "created_at"),
    Index(None, "status"),
)

DISPUTE_STATES = ("open", "won", "lost")

disputes = Table(
    "disputes",
    metadata,
    Column("id", Id, primary_key=True),
    Column("provider", String(32), nullable=False),
    Column("dispute_id", String(255), nullable=False),
    Column("purchase_id", Id, ForeignKey("purchases.id"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("held_uses", Uses, nullable=False),
    # The purchase's unused uses this dispute could not hold when it opened because
    # reservations held them: owed by those reservations (their owed_uses), moved into the
    # hold when they end while it is open; a lost dispute takes the rest back like a refund.
    Column("reserved_uses", Uses, nullable=False, server_default=text("0")),
    Column("created_at", Timestamp, nullable=False),
    Column("closed_at", Timestamp),
    # One row per provider dispute: its hold and its release happen once each.
    UniqueConstraint("provider", "dispute_id"),
    CheckConstraint("held_uses >= 0", name="held_uses_not_negative"),
    CheckConstraint("reserved_uses >= 0", name="reserved_uses_not_negative"),
    CheckConstraint(
        "state IN (" + ", ".join(f"'{s}'" for s in DISPUTE_STATES) + ")", name="state_known"
    ),
)

webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Id, primary_key=True),
    Column("provider", String(32), nullable=False),
    Column("event_id", String(255), nullable=False),
    Column("type", String(100), nullable=False),
    Column("payment_id", String(255)),
    Column("payload", Text, nullable=False),
    Column("received_at", Timestamp, nullable=False),
    # Set only in the transaction that applied the event: a failed attempt leaves it NULL,
    # so the provider's retry (or `webhooks replay`) handles it again.
    Column("handled_at", Timestamp),
    Column("outcome", String(32)),
    Column("attempts", Integer, nullable=False),
    Column("last_error", String(500)),
    # When the background retry (jobs.py) may try a failed event again (backoff); NULL: now.
    Column("next_attempt_at", Timestamp),
    # Each provider event is stored once, however often it is delivered.
    UniqueConstraint("provider", "event_id"),
    Index(None, "handled_at"),
)
