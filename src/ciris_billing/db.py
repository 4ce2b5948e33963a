"""Database: the schema (SQLAlchemy Core tables), the engine, and statement helpers.

The ledger's invariants live here, in the database, so that no code path can break them:
CHECK constraints keep every counter at zero or above, unique constraints make identities,
idempotency keys and external transaction ids impossible to record twice.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ciris_billing import clock
from ciris_billing.config import Settings, async_database_url
from ciris_billing.database_errors import is_read_only

# Stable constraint names, so Alembic migrations and `alembic check` agree.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Id = String(40)
Uses = BigInteger()
Minor = BigInteger()
Timestamp = DateTime(timezone=True)
LotIds = ARRAY(String(40))
LotUses = ARRAY(BigInteger)
LotKinds = ARRAY(SmallInteger)

ACCOUNTS_FILLFACTOR = 80

accounts = Table(
    "accounts",
    metadata,
    Column("id", Id, primary_key=True),
    Column("oauth_provider", String(64), nullable=False),
    Column("external_id", String(255), nullable=False),
    Column("customer_email", String(320)),
    Column("display_name", String(255)),
    Column("plan_name", String(32), nullable=False),
    Column("currency", String(3), nullable=False),
    Column("status", String(16), nullable=False),
    Column("free_uses_remaining", Uses, nullable=False),
    Column("paid_uses_remaining", Uses, nullable=False),
    Column("total_uses", Uses, nullable=False),
    # Written by the charge UPDATE itself: SET sees the old counters, so this column lets
    # RETURNING report how the charge split between free and paid uses without a prior read.
    Column("last_charge_free_uses", Uses, nullable=False),
    # Paid uses frozen by an open dispute: not spendable until the dispute is won.
    Column("held_uses", Uses, nullable=False, server_default=text("0")),
    # Uses held by active reservations (accounts/reservations.py), kept apart from disputes'
    # held_uses: a hold moves its uses OUT of free/paid_uses_remaining into these (free ones
    # first), so charges, refunds and disputes never see them, and back on release or expiry.
    Column("reserved_free_uses", Uses, nullable=False, server_default=text("0")),
    Column("reserved_paid_uses", Uses, nullable=False, server_default=text("0")),
    # Paid uses a refund or a lost dispute should have taken but found held by reservations
    # (never taken from a hold: SPEC.md). Releasing or expiring a hold pays them off before it
    # gives uses back (accounts/reservations.py), so refunded uses never come back; never more
    # than the reserved paid uses (a captured hold's uses were spent: plain shortfall).
    Column("refund_owed_uses", Uses, nullable=False, server_default=text("0")),
    Column("status_reason", String(500)),
    # The sequence number of this account's last event (events/outbox.py): every event of an
    # account takes the next one under the account's row lock, so they are gap-free and ordered.
    Column("event_sequence", BigInteger, nullable=False, server_default=text("0")),
    # balance.low fires when available uses (free + paid) cross below this (NULL: the
    # LOW_BALANCE_THRESHOLD_USES setting).
    Column("low_balance_threshold_uses", BigInteger),
    Column("erased_at", Timestamp),
    # An erased account: HMAC of its old identity with the installation's erasure key
    # (accounts/erasure.py), so whoever knows the identity can still find it; its external_id
    # is then `erased:<account id>`, unique however often one identity is erased.
    Column("erased_digest", String(64)),
    # The wallet (ledger/rules.py): the account's open lots in consumption order, what each has
    # left to give, its kind (0 free, 1 promotional, 2 paid) and expiry. On the account row so
    # that the one statement that locks the row walks it (no second snapshot): the hot
    # statements change lot_left only; ledger/wallet.py adds and removes lots in order.
    Column("lot_ids", LotIds, nullable=False, server_default=text("'{}'")),
    Column("lot_left", LotUses, nullable=False, server_default=text("'{}'")),
    Column("lot_kinds", LotKinds, nullable=False, server_default=text("'{}'")),
    Column("lot_expires", ARRAY(Timestamp), nullable=False, server_default=text("'{}'")),
    # The last walk's take per wallet slot (as last_charge_free_uses keeps its free part), for
    # the movement row the same statement writes.
    Column("last_lot_uses", LotUses, nullable=False, server_default=text("'{}'")),
    # The soonest expires_at in the wallet (NULL: nothing expires): before it the counters are
    # the available uses; past it the walk decides (ledger/rules.py can_take).
    Column("next_expiry_at", Timestamp),
    # FREE_USES_RESET=monthly: the first day (UTC) of the month of the account's current free
    # lot; a month later the next free lot is due (ledger/free_periods.py).
    Column("free_period", DateTime(timezone=True)),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # One account per identity, even when first requests race (INSERT ... ON CONFLICT DO NOTHING).
    UniqueConstraint("oauth_provider", "external_id"),
    Index(
        None, "oauth_provider", "erased_digest", postgresql_where=text("erased_digest IS NOT NULL")
    ),
    CheckConstraint("free_uses_remaining >= 0", name="free_uses_not_negative"),
    CheckConstraint("paid_uses_remaining >= 0", name="paid_uses_not_negative"),
    CheckConstraint("total_uses >= 0", name="total_uses_not_negative"),
    CheckConstraint("last_charge_free_uses >= 0", name="last_charge_free_uses_not_negative"),
    CheckConstraint("held_uses >= 0", name="held_uses_not_negative"),
    CheckConstraint("reserved_free_uses >= 0", name="reserved_free_uses_not_negative"),
    CheckConstraint("reserved_paid_uses >= 0", name="reserved_paid_uses_not_negative"),
    CheckConstraint("refund_owed_uses >= 0", name="refund_owed_uses_not_negative"),
    CheckConstraint(
        "refund_owed_uses <= reserved_paid_uses", name="refund_owed_uses_within_reserved"
    ),
    CheckConstraint("status IN ('active', 'suspended')", name="status_known"),
    CheckConstraint("event_sequence >= 0", name="event_sequence_not_negative"),
    # The wallet's arrays are parallel, and no lot gives more than it has (never below 0).
    CheckConstraint(
        "cardinality(lot_left) = cardinality(lot_ids) "
        "AND cardinality(lot_kinds) = cardinality(lot_ids) "
        "AND cardinality(lot_expires) = cardinality(lot_ids) AND 0 <= ALL (lot_left)",
        name="wallet_consistent",
    ),
    CheckConstraint(
        "low_balance_threshold_uses IS NULL OR low_balance_threshold_uses >= 0",
        name="low_balance_threshold_not_negative",
    ),
    # Every charge updates its account's row. Room left on each page lets PostgreSQL write the
    # new row version beside the old one (a HOT update: no index entries, no other page), also
    # for the first update of a row that has sat untouched since it was inserted.
    postgresql_with={"fillfactor": ACCOUNTS_FILLFACTOR},
)

charges = Table(
    "charges",
    metadata,
    Column("id", Id, primary_key=True),
    Column("account_id", Id, ForeignKey("accounts.id"), nullable=False),
    Column("uses", Uses, nullable=False),
    Column("free_uses_used", Uses, nullable=False),
    Column("paid_uses_used", Uses, nullable=False),
    Column("amount_minor", Minor, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("description", String(500)),
    Column("metadata", JSON, nullable=False),
    # The API key that made the charge: idempotency keys are scoped to it (SPEC.md), and it says
    # who charged. '' on keyed charges made before keys were scoped (LEGACY_SCOPE).
    Column("api_key_id", Id),
    # A charge's idempotency key lives on the charge itself, unique per API key: two requests
    # with one key from one API key can never both commit a charge, and the retry's answer is
    # rebuilt from this row (the fingerprint tells a retry from a different request; the
    # *_after counters are the balances the first answer reported).
    Column("idempotency_key", String(255)),
    Column("request_fingerprint", String(64)),
    Column("free_uses_after", Uses),
    Column("paid_uses_after", Uses),
    Column("total_uses_after", Uses),
    # The reservation this charge captured (accounts/reservations.py); unique, so a
    # reservation is captured into at most one charge whatever races.
    Column("reservation_id", Id, ForeignKey("reservations.id"), unique=True),
    # The lots this charge took from and how many from each (ledger/rules.py); NULL for charges
    # made before lots (the migration's `opening` rows account for those).
    Column("lot_ids", LotIds),
    Column("lot_uses", LotUses),
    Column("created_at", Timestamp, nullable=False),
    CheckConstraint("uses > 0", name="uses_positive"),
    CheckConstraint("free_uses_used >= 0 AND paid_uses_used >= 0", name="split_not_negative"),
    CheckConstraint("free_uses_used + paid_uses_used = uses", name="split_adds_up"),
    CheckConstraint("amount_minor >= 0", name="amount_not_negative"),
    UniqueConstraint("api_key_id", "idempotency_key"),
    Index(None, "account_id", "created_at"),
)

RESERVATION_STATUSES = ("held", "captured", "released", "expired")

reservations = Table(
    "reservations",
    metadata,
    Column("id", Id, primary_key=True),
    Column("account_id", Id, ForeignKey("accounts.id"), nullable=False),
    # The API key that made the hold (who reserved; its idempotency key's scope).
    Column("api_key_id", Id, nullable=False),
    # held -> captured | released | expired, each once: every transition is a conditional
    # UPDATE ... WHERE status = 'held' (accounts/reservations.py).
    Column("status", String(16), nullable=False),
    Column("uses", Uses, nullable=False),
    # How the held uses split: they go back to (or are charged from) these counters.
    Column("free_uses_held", Uses, nullable=False),
    Column("paid_uses_held", Uses, nullable=False),
    Column("captured_uses", Uses),
    Column("charge_id", Id),
    Column("expires_at", Timestamp, nullable=False),
    Column("metadata", JSON, nullable=False),
    Column("idempotency_key", String(255)),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    Column("closed_at", Timestamp),
    # Of the paid uses held, those a dispute that opened meanwhile could not hold (a hold is a
    # promise): owed to that dispute (its row id), moved into its hold when this hold ends
    # (payments/disputes.py, accounts/reservations.py). The hot capture leaves these alone.
    Column("owed_dispute_id", Id),
    Column("owed_uses", Uses, nullable=False, server_default=text("0")),
    # The lots this hold took from, their kinds and the uses held of each: what a capture
    # spends from and a release gives back to (ledger/rules.py).
    Column("lot_ids", LotIds),
    Column("lot_kinds", LotKinds),
    Column("lot_uses", LotUses),
    CheckConstraint("uses > 0", name="uses_positive"),
    CheckConstraint("owed_uses >= 0 AND owed_uses <= paid_uses_held", name="owed_within_paid_held"),
    CheckConstraint(
        "free_uses_held >= 0 AND paid_uses_held >= 0 AND free_uses_held + paid_uses_held = uses",
        name="held_split_adds_up",
    ),
    CheckConstraint(
        "captured_uses IS NULL OR (captured_uses > 0 AND captured_uses <= uses)",
        name="captured_within_held",
    ),
    CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in RESERVATION_STATUSES) + ")",
        name="status_known",
    ),
    Index(None, "account_id", "created_at"),
    # The expiry job's scan: only active holds, by deadline.
    Index(
        "ix_reservations_held_expires_at", "expires_at", postgresql_where=text("status = 'held'")
    ),
)

CREDIT_KINDS = (
    "free_grant",
    "initial_balance",
    "purchase",
    "grant",
    "adjustment",
    "refund",
    "dispute_hold",
    "dispute_lost",
    "dispute_won",
    "owed_taken",  # owed uses paid off when a hold gave uses back (accounts.refund_owed_uses)
    "opening",  # migration 20261207_lots: per lot, what was spent before lots existed
    "expired",  # a lot's remaining uses at its expiry (breakage)
    "void",  # an operator voided a lot's remaining uses
    "free_period",  # FREE_USES_RESET=monthly: a month's free uses
)

credits = Table(
    "credits",
    metadata,
    Column("id", Id, primary_key=True),
    Column("account_id", Id, ForeignKey("accounts.id"), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("free_uses_delta", Uses, nullable=False),
    Column("paid_uses_delta", Uses, nullable=False),
    Column("held_uses_delta", Uses, nullable=False, server_default=text("0")),
    # Uses a refund should have taken back but could not (already spent): never negative
    # balances, the difference is recorded here instead.
    Column("shortfall_uses", Uses, nullable=False, server_default=text("0")),
    Column("amount_minor", Minor, nullable=False),
    Column("currency", String(3), nullable=False),
    # A provider's id for the money behind this row (e.g. a Stripe `pi_...`): unique, so a
    # payment can never be credited twice, whichever path (webhook, reconcile) gets there first.
    Column("external_transaction_id", String(255), unique=True),
    Column("description", String(500)),
    Column("idempotency_key", String(255)),
    # The API key whose request wrote the row (a grant, a refund...; NULL: the CLI, a job, a
    # webhook). The operator's audit-trail row says who and by which door.
    Column("api_key_id", Id),
    # The lots this row moved and by how much each (signed: + gives uses to the lot, - takes).
    Column("lot_ids", LotIds),
    Column("lot_uses", LotUses),
    Column("created_at", Timestamp, nullable=False),
    CheckConstraint(
        "kind IN (" + ", ".join(f"'{kind}'" for kind in CREDIT_KINDS) + ")",
        name="kind_known",
    ),
    CheckConstraint("shortfall_uses >= 0", name="shortfall_not_negative"),
    Index(None, "account_id", "created_at"),
)

LOT_STATUSES = ("active", "used", "expired", "voided", "erased")

# Every grant of uses is a lot (ledger/wallet.py). What a lot has left lives in its account's
# wallet while it is open (status 'active'); a closed lot has nothing left.
lots = Table(
    "lots",
    metadata,
    Column("id", Id, primary_key=True),
    Column("account_id", Id, ForeignKey("accounts.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    # What granted it: free_grant, free_period, purchase, auto_topup, grant, initial_balance,
    # migration...
    Column("source", String(32), nullable=False),
    Column("priority", Integer, nullable=False, server_default=text("100")),
    Column("expires_at", Timestamp),
    Column("uses_granted", Uses, nullable=False),
    # What was paid for the whole lot (0 for free and promotional lots) and its per-use cost
    # basis (amount_minor / uses_granted, rounded down; revenue rounds per lot, cumulatively).
    Column("amount_minor", Minor, nullable=False, server_default=text("0")),
    Column("currency", String(3), nullable=False),
    Column("cost_basis_minor", Minor),
    Column("purchase_id", Id, ForeignKey("purchases.id")),
    # The credits row that granted it.
    Column("credit_id", Id),
    Column("status", String(16), nullable=False, server_default=text("'active'")),
    Column("closed_at", Timestamp),
    Column("created_at", Timestamp, nullable=False),
    # When credits.expiring went out for it (once per lot: accounts/lot_expiry.py).
    Column("expiring_notified_at", Timestamp),
    # When an operator voided it: what was left then was voided at once; a lot that open holds
    # still name stays in its wallet, unusable from then on, until the expiry job closes it.
    Column("voided_at", Timestamp),
    CheckConstraint("kind IN ('free', 'promotional', 'paid')", name="kind_known"),
    CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in LOT_STATUSES) + ")", name="status_known"
    ),
    CheckConstraint("uses_granted >= 0", name="granted_not_negative"),
    CheckConstraint("amount_minor >= 0", name="amount_not_negative"),
    CheckConstraint("kind = 'paid' OR amount_minor = 0", name="only_paid_lots_cost"),
    Index(None, "account_id", "created_at"),
    # One lot per purchase: a purchase credited twice (it cannot be) would fail here too.
    Index(
        "ix_lots_purchase_id",
        "purchase_id",
        unique=True,
        postgresql_where=text("purchase_id IS NOT NULL"),
    ),
    # The expiry job's scan: open lots by expiry.
    Index(
        "ix_lots_open_expires_at",
        "expires_at",
        postgresql_where=text("status = 'active' AND expires_at IS NOT NULL"),
    ),
    # ...and voided lots still in a wallet (open holds named them).
    Index(
        "ix_lots_open_voided_at",
        "voided_at",
        postgresql_where=text("status = 'active' AND voided_at IS NOT NULL"),
    ),
)


api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Id, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("key_prefix", String(16), nullable=False),
    # SHA-256 of the key: keys are 256-bit random, so a fast hash is safe and costs microseconds.
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("scopes", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("revoked_at", Timestamp),
)

# Idempotency keys of requests made before keys were scoped to API keys (migration 0007): which
# API key sent them is unknown, so they are no API key's (idempotency.py refuses their reuse).
LEGACY_SCOPE = ""

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    # Scoped to the API key that sent it (SPEC.md): (API key, key) is the primary key, so two
    # requests with one key from one API key can never both commit; another API key's
    # request with the same key is another request.
    Column("api_key_id", Id, primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("response_status", Integer, nullable=False),
    Column("response_body", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
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
    # One purchase per provider payment: a retried create finds the row instead of adding one.
    UniqueConstraint("provider", "payment_id"),
    CheckConstraint("amount_minor > 0", name="amount_positive"),
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

installation_secrets = Table(
    "installation_secrets",
    metadata,
    # Secrets made once per installation (installation.py): the first process to start
    # inserts them, every other worker, instance and restart reads the same ones.
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
)


portal_link_revocations = Table(
    "portal_link_revocations",
    metadata,
    # An account's portal links made before `revoked_at` are void (portal/links.py): links are
    # sealed and stateless to mint, so revocation is a time per account, read when one is opened.
    Column("account_id", Id, ForeignKey("accounts.id"), primary_key=True),
    Column("revoked_at", Timestamp, nullable=False),
)

test_clock = Table(
    "test_clock",
    metadata,
    # The sandbox's test clock (clock.py, testclock/): how far the installation's "now" is
    # ahead of the real time. One row at most (id 1); none means 0. Moves forward only.
    # updated_at: the real (wall-clock) time of the last advance.
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("offset_seconds", BigInteger, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint("id = 1", name="one_row"),
    CheckConstraint("offset_seconds >= 0", name="forward_only"),
)

console_sessions = Table(
    "console_sessions",
    metadata,
    # The operator console's server-side sessions (console/sessions.py). The cookie holds a
    # random 256-bit token; only its SHA-256 is stored, so a copy of this table logs no one in.
    Column("id", String(64), primary_key=True),
    Column("api_key_id", Id, ForeignKey("api_keys.id"), nullable=False),
    # Compared with every form the session posts (CSRF); random, per session.
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("last_seen_at", Timestamp, nullable=False),
    # The absolute end, whatever the activity (the idle end is last_seen_at + the idle limit).
    Column("expires_at", Timestamp, nullable=False),
    Index(None, "api_key_id"),
)

audit_trail = Table(
    "audit_trail",
    metadata,
    # Every operator action, whatever the door (audit_trail.py): who (the API key's name),
    # when, what, and the state before and after, written in the action's own transaction.
    Column("id", Id, primary_key=True),
    Column("created_at", Timestamp, nullable=False),
    Column("actor", String(100), nullable=False),
    Column("api_key_id", Id),
    # The door the action came through: 'api' (actor: the API key's name), 'cli' (actor: the
    # operating-system user) or 'console' (actor: the signed-in key's name).
    Column("door", String(16), nullable=False, server_default=text("'console'")),
    Column("action", String(32), nullable=False),
    Column("account_id", Id, ForeignKey("accounts.id")),
    # What the action was about besides the account: a payment, reservation, event or key id.
    Column("subject", String(255)),
    Column("detail", JSON, nullable=False),
    Column("before", JSON, nullable=False),
    Column("after", JSON, nullable=False),
    # The confirmation's one-time id: a confirmation submitted twice is applied once (the
    # second insert conflicts and its transaction, action included, rolls back).
    Column("request_id", String(64), nullable=False, unique=True),
    Index(None, "account_id", "created_at"),
    Index(None, "created_at"),
)


# The console's look-ups (console/queries.py). Searches match an identity or email whatever
# its case. The day's charges are counted through a BRIN index: rows arrive in time order, so
# it is a few pages and costs the charge INSERT next to nothing (a b-tree would be one more
# index insert per charge on the hot path).
Index("ix_accounts_lower_external_id", func.lower(accounts.c.external_id))
Index("ix_accounts_lower_customer_email", func.lower(accounts.c.customer_email))
Index("ix_charges_created_at_brin", charges.c.created_at, postgresql_using="brin")
Index("ix_purchases_created_at", purchases.c.created_at)
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


def _replace_closed_connections(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # A pooled connection the server closed while it sat idle (a restart, a terminated
        # backend) is known closed by the driver already: the pool replaces it now, at no
        # round-trip cost, instead of handing it to a request that would fail with a 503.
        if record.driver_connection.is_closed():
            raise DisconnectionError("connection closed while idle in the pool")


# How long a request waits for a pooled connection before it is answered 503 (the engine's
# pool waits as long, then raises its TimeoutError).
POOL_TIMEOUT_SECONDS = 30
