"""revenue rollups: closed days' revenue and usage figures, each paid lot's exhausted uses

Revision ID: 20261207_revenue_rollups
Revises: 20261207_hot_wallet
Create Date: 2026-12-07 20:15:00

Issue 25 item 6: the revenue report reads closed days from `revenue_days` (one row per day and
currency, deferred revenue at its end) and computes only the days since `revenue_rollup`'s
`rolled_until` from the ledger, starting each paid lot from `revenue_lot_states`; the usage
report reads closed days' uses by kind and feature from `usage_days` and closed days' and
months' active accounts from `usage_active`. Empty at
first: the recovery job (or the first report) fills them from the ledger. Nothing is added to
the charges' statements.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261207_revenue_rollups"
down_revision: str | None = "20261207_hot_wallet"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "revenue_days",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("currency", sa.String(length=3), nullable=False),
        sa.Column("purchases_minor", sa.BigInteger(), nullable=False),
        sa.Column("refunds_minor", sa.BigInteger(), nullable=False),
        sa.Column("recognized_minor", sa.BigInteger(), nullable=False),
        sa.Column("breakage_minor", sa.BigInteger(), nullable=False),
        sa.Column("deferred_end_minor", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "currency", name=op.f("pk_revenue_days")),
    )
    op.create_table(
        "revenue_lot_states",
        sa.Column("lot_id", sa.String(length=40), nullable=False),
        sa.Column("exhausted_uses", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("lot_id", name=op.f("pk_revenue_lot_states")),
    )
    op.create_table(
        "usage_days",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("feature", sa.String(length=64), nullable=False),
        sa.Column("uses", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("day", "kind", "feature", name=op.f("pk_usage_days")),
    )
    op.create_table(
        "usage_active",
        sa.Column("period", sa.String(length=10), nullable=False),
        sa.Column("accounts", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("period", name=op.f("pk_usage_active")),
    )
    op.create_table(
        "revenue_rollup",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("rolled_until", sa.Date(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_revenue_rollup_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_revenue_rollup")),
    )


def downgrade() -> None:
    op.drop_table("revenue_rollup")
    op.drop_table("usage_active")
    op.drop_table("usage_days")
    op.drop_table("revenue_lot_states")
    op.drop_table("revenue_days")
