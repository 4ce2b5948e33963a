"""The catalog: packs (what a purchase buys), plans (free uses and which packs), promotion
codes and their redemptions (catalog/)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY

from ciris_billing.tables.base import Id, Minor, Timestamp, Uses, metadata

PackId = String(64)
PromotionCode = String(64)

# The default pack ("default") is not a row: it comes from PAID_USES_PER_PURCHASE,
# PRICE_PER_PURCHASE_MINOR and CURRENCY (catalog/packs.py).
packs = Table(
    "packs",
    metadata,
    Column("pack_id", PackId, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("uses", Uses, nullable=False),
    Column("price_minor", Minor, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("expires_in_days", Integer),
    Column("active", Boolean, nullable=False, server_default=text("true")),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint("uses > 0", name="uses_positive"),
    CheckConstraint("price_minor > 0", name="price_positive"),
    CheckConstraint(
        "expires_in_days IS NULL OR expires_in_days > 0", name="expires_in_days_positive"
    ),
)

# The default plans ("free", and "paid" that a first purchase moves an account to) are not rows:
# they come from FREE_USES_PER_ACCOUNT and FREE_USES_RESET (catalog/plans.py). An account's
# plan_name that names no row and no default plan counts as the default plan.
plans = Table(
    "plans",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("free_uses", Uses, nullable=False),
    Column("free_uses_reset", String(16), nullable=False),
    # NULL: every active pack.
    Column("pack_ids", ARRAY(PackId)),
    Column("low_balance_threshold_uses", BigInteger),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint("free_uses >= 0", name="free_uses_not_negative"),
    CheckConstraint("free_uses_reset IN ('never', 'monthly')", name="free_uses_reset_known"),
    CheckConstraint(
        "low_balance_threshold_uses IS NULL OR low_balance_threshold_uses >= 0",
        name="low_balance_threshold_not_negative",
    ),
)

promotion_codes = Table(
    "promotion_codes",
    metadata,
    Column("code", PromotionCode, primary_key=True),
    Column("percent_off", Integer),
    # In the minor units of the pack bought (whatever its currency).
    Column("amount_off_minor", Minor),
    # NULL: every pack.
    Column("pack_ids", ARRAY(PackId)),
    Column("max_redemptions", BigInteger),
    # Moved only by a conditional UPDATE that refuses to pass max_redemptions (catalog/codes.py).
    Column("redemptions", BigInteger, nullable=False, server_default=text("0")),
    Column("once_per_account", Boolean, nullable=False, server_default=text("false")),
    Column("expires_at", Timestamp),
    Column("active", Boolean, nullable=False, server_default=text("true")),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    CheckConstraint("(percent_off IS NULL) <> (amount_off_minor IS NULL)", name="one_discount"),
    CheckConstraint(
        "percent_off IS NULL OR (percent_off > 0 AND percent_off <= 100)", name="percent_in_range"
    ),
    CheckConstraint("amount_off_minor IS NULL OR amount_off_minor > 0", name="amount_positive"),
    CheckConstraint("max_redemptions IS NULL OR max_redemptions > 0", name="max_positive"),
    # The database's own word that a limit is never passed, whatever the code does.
    CheckConstraint(
        "redemptions >= 0 AND (max_redemptions IS NULL OR redemptions <= max_redemptions)",
        name="redemptions_within_max",
    ),
)

promotion_redemptions = Table(
    "promotion_redemptions",
    metadata,
    Column("id", Id, primary_key=True),
    Column("code", PromotionCode, ForeignKey("promotion_codes.code"), nullable=False),
    Column("account_id", Id, ForeignKey("accounts.id"), nullable=False),
    # The purchase it discounted (or the grant a free one made: no purchase row then).
    Column("purchase_id", Id, nullable=False, unique=True),
    Column("once_per_account", Boolean, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    # once_per_account: one redemption per account, whatever races (a second insert fails).
    Index(
        "ix_promotion_redemptions_once",
        "code",
        "account_id",
        unique=True,
        postgresql_where=text("once_per_account"),
    ),
)
