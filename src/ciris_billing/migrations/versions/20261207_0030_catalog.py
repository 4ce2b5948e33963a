"""catalog: packs, plans, promotion codes and their redemptions; the pack on purchases and lots

Revision ID: 20261207_catalog
Revises: 20261207_rates
Create Date: 2026-12-07 20:00:00

Issue 24 items 1, 2 and 4. The default pack and plans are not rows (they come from the
environment), so nothing is seeded and a down migration loses only what operators added.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "20261207_catalog"
down_revision: str | None = "20261207_rates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "packs",
        sa.Column("pack_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("uses", sa.BigInteger(), nullable=False),
        sa.Column("price_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("expires_in_days", sa.Integer()),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint("uses > 0", name=op.f("ck_packs_uses_positive")),
        sa.CheckConstraint("price_minor > 0", name=op.f("ck_packs_price_positive")),
        sa.CheckConstraint(
            "expires_in_days IS NULL OR expires_in_days > 0",
            name=op.f("ck_packs_expires_in_days_positive"),
        ),
        sa.PrimaryKeyConstraint("pack_id", name=op.f("pk_packs")),
    )
    op.create_table(
        "plans",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("free_uses", sa.BigInteger(), nullable=False),
        sa.Column("free_uses_reset", sa.String(16), nullable=False),
        sa.Column("pack_ids", postgresql.ARRAY(sa.String(64))),
        sa.Column("low_balance_threshold_uses", sa.BigInteger()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint("free_uses >= 0", name=op.f("ck_plans_free_uses_not_negative")),
        sa.CheckConstraint(
            "free_uses_reset IN ('never', 'monthly')", name=op.f("ck_plans_free_uses_reset_known")
        ),
        sa.CheckConstraint(
            "low_balance_threshold_uses IS NULL OR low_balance_threshold_uses >= 0",
            name=op.f("ck_plans_low_balance_threshold_not_negative"),
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_plans")),
    )
    op.create_table(
        "promotion_codes",
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("percent_off", sa.Integer()),
        sa.Column("amount_off_minor", sa.BigInteger()),
        sa.Column("pack_ids", postgresql.ARRAY(sa.String(64))),
        sa.Column("max_redemptions", sa.BigInteger()),
        sa.Column("redemptions", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "once_per_account", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("expires_at", TS),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            "(percent_off IS NULL) <> (amount_off_minor IS NULL)",
            name=op.f("ck_promotion_codes_one_discount"),
        ),
        sa.CheckConstraint(
            "percent_off IS NULL OR (percent_off > 0 AND percent_off <= 100)",
            name=op.f("ck_promotion_codes_percent_in_range"),
        ),
        sa.CheckConstraint(
            "amount_off_minor IS NULL OR amount_off_minor > 0",
            name=op.f("ck_promotion_codes_amount_positive"),
        ),
        sa.CheckConstraint(
            "max_redemptions IS NULL OR max_redemptions > 0",
            name=op.f("ck_promotion_codes_max_positive"),
        ),
        sa.CheckConstraint(
            "redemptions >= 0 AND (max_redemptions IS NULL OR redemptions <= max_redemptions)",
            name=op.f("ck_promotion_codes_redemptions_within_max"),
        ),
        sa.PrimaryKeyConstraint("code", name=op.f("pk_promotion_codes")),
    )
    op.create_table(
        "promotion_redemptions",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("purchase_id", sa.String(40), nullable=False),
        sa.Column("once_per_account", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["code"],
            ["promotion_codes.code"],
            name=op.f("fk_promotion_redemptions_code_promotion_codes"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_promotion_redemptions_account_id_accounts"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_promotion_redemptions")),
        sa.UniqueConstraint("purchase_id", name=op.f("uq_promotion_redemptions_purchase_id")),
    )
    op.create_index(
        "ix_promotion_redemptions_once",
        "promotion_redemptions",
        ["code", "account_id"],
        unique=True,
        postgresql_where=sa.text("once_per_account"),
    )
    op.add_column("purchases", sa.Column("pack_id", sa.String(64)))
    op.add_column("purchases", sa.Column("promotion_code", sa.String(64)))
    op.add_column("purchases", sa.Column("lot_expires_in_days", sa.Integer()))
    op.add_column(
        "purchases",
        sa.Column("discount_minor", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("lots", sa.Column("pack_id", sa.String(64)))
    # A purchase a promotion code made free costs 0 and has no payment (provider "promotion").
    op.drop_constraint(op.f("ck_purchases_amount_positive"), "purchases", type_="check")
    op.create_check_constraint(
        op.f("ck_purchases_amount_positive"),
        "purchases",
        "amount_minor > 0 OR (amount_minor = 0 AND provider = 'promotion')",
    )


def downgrade() -> None:
    op.execute("DELETE FROM purchases WHERE provider = 'promotion'")
    op.drop_constraint(op.f("ck_purchases_amount_positive"), "purchases", type_="check")
    op.create_check_constraint(
        op.f("ck_purchases_amount_positive"), "purchases", "amount_minor > 0"
    )
    op.drop_column("lots", "pack_id")
    op.drop_column("purchases", "discount_minor")
    op.drop_column("purchases", "lot_expires_in_days")
    op.drop_column("purchases", "promotion_code")
    op.drop_column("purchases", "pack_id")
    op.drop_index("ix_promotion_redemptions_once", table_name="promotion_redemptions")
    op.drop_table("promotion_redemptions")
    op.drop_table("promotion_codes")
    op.drop_table("plans")
    op.drop_table("packs")
