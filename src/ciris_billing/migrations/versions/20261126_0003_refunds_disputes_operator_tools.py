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
        sa.Column("held_uses", sa.BigInteger(), nullable=False),
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
    op.add_column(
        "accounts",
        sa.Column(
            "held_uses",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
        ),
    )
    op.add_column("accounts", sa.Column("status_reason", sa.String(length=500), nullable=True))
    op.add_column("accounts", sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint("held_uses_not_negative", "accounts", "held_uses >= 0")

    op.add_column(
        "credits",
        sa.Column(
            "held_uses_delta",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
        ),
    )
    op.add_column(
        "credits",
        sa.Column(
            "shortfall_uses",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
        ),
    )
    op.create_check_constraint("shortfall_not_negative", "credits", "shortfall_uses >= 0")
    op.drop_constraint(op.f("ck_credits_kind_known"), "credits", type_="check")
    op.create_check_constraint("kind_known", "credits", _in("kind", CREDIT_KINDS))

    op.add_column(
        "purchases",
        sa.Column(
            "refunded_minor",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
        ),
    )
    op.add_column(
        "purchases",
        sa.Column(
            "uses_refunded",
            sa.BigInteger(),
            server_default=sa.text("0"),
            nullable=False,
        ),
    )
    op.create_check_constraint(
        "refund_within_amount",
        "purchases",
        "refunded_minor >= 0 AND refunded_minor <= amount_minor",
    )
    op.create_check_constraint(
        "uses_refunded_within", "purchases", "uses_refunded >= 0 AND uses_refunded <= uses"
    )
    op.drop_constraint(op.f("ck_purchases_status_known"), "purchases", type_="check")
    op.create_check_constraint("status_known", "purchases", _in("status", PURCHASE_STATUSES))

    op.add_column("sandbox_payments", sa.Column("dispute_id", sa.String(length=64), nullable=True))
    op.add_column(
        "sandbox_payments", sa.Column("dispute_status", sa.String(length=32), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("sandbox_payments", "dispute_status")
    op.drop_column("sandbox_payments", "dispute_id")

    op.drop_constraint(op.f("ck_purchases_status_known"), "purchases", type_="check")
    op.create_check_constraint("status_known", "purchases", _in("status", OLD_PURCHASE_STATUSES))
    op.drop_constraint(op.f("ck_purchases_refund_within_amount"), "purchases", type_="check")
    op.drop_constraint(op.f("ck_purchases_uses_refunded_within"), "purchases", type_="check")
    op.drop_column("purchases", "uses_refunded")
    op.drop_column("purchases", "refunded_minor")

    op.drop_constraint(op.f("ck_credits_kind_known"), "credits", type_="check")
    op.create_check_constraint("kind_known", "credits", _in("kind", OLD_CREDIT_KINDS))
    op.drop_constraint(op.f("ck_credits_shortfall_not_negative"), "credits", type_="check")
    op.drop_column("credits", "shortfall_uses")
    op.drop_column("credits", "held_uses_delta")

    op.drop_constraint(op.f("ck_accounts_held_uses_not_negative"), "accounts", type_="check")
    op.drop_column("accounts", "erased_at")
    op.drop_column("accounts", "status_reason")
    op.drop_column("accounts", "held_uses")

    op.drop_table("disputes")
