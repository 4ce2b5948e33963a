"""refunds disputes operator tools

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 04:38:42.313839
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from ciris_billing.db import CREDIT_KINDS

OLD_CREDIT_KINDS = ("free_grant", "initial_balance", "purchase", "grant", "adjustment", "refund")
# Frozen here: the statuses as of this revision (0006 replaced them with our own words).
OLD_PURCHASE_STATUSES = (
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "processing",
    "requires_capture",
    "succeeded",
    "failed",
    "canceled",
)
PURCHASE_STATUSES = (*OLD_PURCHASE_STATUSES, "partially_refunded", "refunded")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "disputes",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("dispute_id", sa.String(length=255), nullable=False),
        sa.Column("purchase_id", sa.String(length=40), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column(
            "held_uses", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('open', 'won', 'lost')", name=op.f("ck_disputes_state_known")
        ),
        sa.CheckConstraint("held_uses >= 0", name=op.f("ck_disputes_held_uses_not_negative")),
        sa.ForeignKeyConstraint(
            ["purchase_id"], ["purchases.id"], name=op.f("fk_disputes_purchase_id_purchases")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_disputes")),
        sa.UniqueConstraint("provider", "dispute_id", name=op.f("uq_disputes_provider_dispute_id")),
    )
    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "held_uses",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                server_default=sa.text("0"),
                nullable=False,
            )
        )
        batch_op.add_column(sa.Column("status_reason", sa.String(length=500), nullable=True))
        batch_op.add_column(sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_check_constraint("held_uses_not_negative", "held_uses >= 0")

    with op.batch_alter_table("credits", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "held_uses_delta",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                server_default=sa.text("0"),
                nullable=False,
            )
        )
        batch_op.add_column(
            sa.Column(
                "shortfall_uses",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                server_default=sa.text("0"),
                nullable=False,
            )
        )
        batch_op.create_check_constraint("shortfall_not_negative", "shortfall_uses >= 0")
        batch_op.drop_constraint(op.f("ck_credits_kind_known"), type_="check")
        batch_op.create_check_constraint("kind_known", _in("kind", CREDIT_KINDS))

    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "refunded_minor",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                server_default=sa.text("0"),
                nullable=False,
            )
        )
        batch_op.add_column(
            sa.Column(
                "uses_refunded",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                server_default=sa.text("0"),
                nullable=False,
            )
        )
        batch_op.create_check_constraint(
            "refund_within_amount", "refunded_minor >= 0 AND refunded_minor <= amount_minor"
        )
        batch_op.create_check_constraint(
            "uses_refunded_within", "uses_refunded >= 0 AND uses_refunded <= uses"
        )
        batch_op.drop_constraint(op.f("ck_purchases_status_known"), type_="check")
        batch_op.create_check_constraint("status_known", _in("status", PURCHASE_STATUSES))

    with op.batch_alter_table("sandbox_payments", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dispute_id", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("dispute_status", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sandbox_payments", schema=None) as batch_op:
        batch_op.drop_column("dispute_status")
        batch_op.drop_column("dispute_id")

    with op.batch_alter_table("purchases", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_purchases_status_known"), type_="check")
        batch_op.create_check_constraint("status_known", _in("status", OLD_PURCHASE_STATUSES))
        batch_op.drop_constraint(op.f("ck_purchases_refund_within_amount"), type_="check")
        batch_op.drop_constraint(op.f("ck_purchases_uses_refunded_within"), type_="check")
        batch_op.drop_column("uses_refunded")
        batch_op.drop_column("refunded_minor")

    with op.batch_alter_table("credits", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_credits_kind_known"), type_="check")
        batch_op.create_check_constraint("kind_known", _in("kind", OLD_CREDIT_KINDS))
        batch_op.drop_constraint(op.f("ck_credits_shortfall_not_negative"), type_="check")
        batch_op.drop_column("shortfall_uses")
        batch_op.drop_column("held_uses_delta")

    with op.batch_alter_table("accounts", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("ck_accounts_held_uses_not_negative"), type_="check")
        batch_op.drop_column("erased_at")
        batch_op.drop_column("status_reason")
        batch_op.drop_column("held_uses")

    op.drop_table("disputes")
