"""charge idempotency on the charge

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 05:09:34.002847
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("charges", schema=None) as batch_op:
        batch_op.add_column(sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
        batch_op.add_column(
            sa.Column(
                "free_uses_after",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )
        batch_op.add_column(
            sa.Column(
                "paid_uses_after",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )
        batch_op.add_column(
            sa.Column(
                "total_uses_after",
                sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                nullable=True,
            )
        )
        batch_op.create_unique_constraint(
            batch_op.f("uq_charges_idempotency_key"), ["idempotency_key"]
        )


def downgrade() -> None:
    with op.batch_alter_table("charges", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_charges_idempotency_key"), type_="unique")
        batch_op.drop_column("total_uses_after")
        batch_op.drop_column("paid_uses_after")
        batch_op.drop_column("free_uses_after")
        batch_op.drop_column("request_fingerprint")
