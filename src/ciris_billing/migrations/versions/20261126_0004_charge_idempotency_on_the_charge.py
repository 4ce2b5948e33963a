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
    op.add_column("charges", sa.Column("request_fingerprint", sa.String(length=64), nullable=True))
    op.add_column(
        "charges",
        sa.Column(
            "free_uses_after",
            sa.BigInteger(),
            nullable=True,
        ),
    )
    op.add_column(
        "charges",
        sa.Column(
            "paid_uses_after",
            sa.BigInteger(),
            nullable=True,
        ),
    )
    op.add_column(
        "charges",
        sa.Column(
            "total_uses_after",
            sa.BigInteger(),
            nullable=True,
        ),
    )
    op.create_unique_constraint(op.f("uq_charges_idempotency_key"), "charges", ["idempotency_key"])


def downgrade() -> None:
    op.drop_constraint(op.f("uq_charges_idempotency_key"), "charges", type_="unique")
    op.drop_column("charges", "total_uses_after")
    op.drop_column("charges", "paid_uses_after")
    op.drop_column("charges", "free_uses_after")
    op.drop_column("charges", "request_fingerprint")
