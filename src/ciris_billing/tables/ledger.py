"""The ledger's tables: accounts, charges, reservations, credits and lots."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY

from ciris_billing.tables.base import (
    ACCOUNTS_FILLFACTOR,
    Id,
    LotIds,
    LotKinds,
    LotUses,
    Minor,
    Timestamp,
    Uses,
    metadata,
)

COUNTS_NOT_NEGATIVE = (
    "free_uses_remaining >= 0 AND paid_uses_remaining >= 0 AND total_uses >= 0 "
    "AND last_charge_free_uses >= 0 AND held_uses >= 0 AND reserved_free_uses >= 0 "
    "AND reserved_paid_uses >= 0 AND refund_owed_uses >= 0 AND event_sequence >= 0 "
    "AND 0 <= ALL (lot_left)"
)

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
    # The lots the last walk touched, their kinds and the uses it took from each (as
    # last_charge_free_uses keeps its free part), for the movement row the same statement
    # writes (RETURNING sees the row after the walk).
    Column("last_lot_ids", LotIds, nullable=False, server_default=text("'{}'")),
    Column("last_lot_kinds", LotKinds, nullable=False, server_default=text("'{}'")),
    Column("last_lot_uses", LotUses, nullable=False, server_default=text("'{}'")),
    # The soonest expires_at in the wallet (NULL: nothing expires): before it the counters are
    # the available uses; past it the walk decides (ledger/rules.py can_take).
    Column("next_expiry_at", Timestamp),
    # FREE_USES_RESET=monthly: the first day (UTC) of the month of the account's current free
    # lot; a month later the next free lot is due (ledger/free_periods.py).
    Column("free_period", DateTime(timezone=True)),
    # Rated usage with `carry` rounding (rates/service.py): per feature, the quantity charged
    # and not yet making a whole use, as parallel arrays. On the account row for the wallet's
    # reason: the one statement that locks the row reads and writes it, so concurrent charges
    # (re-checked by PostgreSQL on the locked row) carry exactly.
    Column("carry_features", ARRAY(String(64)), nullable=False, server_default=text("'{}'")),
    Column("carry_left", LotUses, nullable=False, server_default=text("'{}'")),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    # One account per identity, even when first requests race (INSERT ... ON CONFLICT DO NOTHING).
    UniqueConstraint("oauth_provider", "external_id"),
    Index(
        None, "oauth_provider", "erased_digest", postgresql_where=text("erased_digest IS NOT NULL")
    ),
    # No count goes below 0, and no lot gives more than it has. One CHECK, not ten: PostgreSQL
    # reads and compiles each CHECK on every statement that writes the row (a charge too). That
    # the wallet's arrays stay parallel is by construction (ledger/wallet.py writes all four,
    # the walk only lot_left, slot for slot) and audited (ledger/lot_audit.py), not checked
    # here: those three cardinality tests cost a charge ~7% (callgrind, issue 23's bench).
    CheckConstraint(COUNTS_NOT_NEGATIVE, name="counts_not_negative"),
    CheckConstraint(
        "refund_owed_uses <= reserved_paid_uses", name="refund_owed_uses_within_reserved"
    ),
    CheckConstraint("status IN ('active', 'suspended')", name="status_known"),
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
    # A rated charge's feature and quantity (rates/service.py); NULL for a charge in uses. A
    # `carry` charge whose quantity completes no use takes 0 uses (and names no lot).
    Column("feature", String(64)),
    Column("quantity", BigInteger),
    Column("created_at", Timestamp, nullable=False),
    CheckConstraint("uses > 0 OR feature IS NOT NULL", name="uses_positive"),
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
    # A hold by a feature with a `carry` rate (accounts/reservations.py): its feature, quantity
    # and the rate's units per use; the capture applies the carry and may capture 0 uses.
    Column("feature", String(64)),
    Column("quantity", BigInteger),
    Column("units_per_use", BigInteger),
    CheckConstraint("uses > 0", name="uses_positive"),
    CheckConstraint(
        "units_per_use IS NULL OR (feature IS NOT NULL AND quantity > 0 AND units_per_use > 0)",
        name="carry_complete",
    ),
    CheckConstraint("owed_uses >= 0 AND owed_uses <= paid_uses_held", name="owed_within_paid_held"),
    CheckConstraint(
        "free_uses_held >= 0 AND paid_uses_held >= 0 AND free_uses_held + paid_uses_held = uses",
        name="held_split_adds_up",
    ),
    CheckConstraint(
        "captured_uses IS NULL OR (captured_uses <= uses"
        " AND (captured_uses > 0 OR (captured_uses = 0 AND units_per_use IS NOT NULL)))",
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
    # The pack a purchase's lot came from (catalog/packs.py).
    Column("pack_id", String(64)),
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
