"""carry holds: a hold by a `carry` feature keeps its feature, quantity and rate

Revision ID: 20261207_carry_holds
Revises: 20261207_catalog
Create Date: 2026-12-07 22:30:00

Issue 24 item 3 (holds). A hold by a feature with a `carry` rate holds the uses its quantity
can complete whatever the account carries (ceil(quantity / units_per_use): the carried
remainder is below one use), and keeps the feature, the quantity and the rate's units; its
capture (by the quantity the interaction used, at most the held one) applies the carry on the
locked account row and may capture 0 uses (all given back, the remainder kept).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261207_carry_holds"
down_revision: str | None = "20261207_catalog"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CARRIED = "units_per_use IS NULL OR (feature IS NOT NULL AND quantity > 0 AND units_per_use > 0)"
CAPTURED_BEFORE = "captured_uses IS NULL OR (captured_uses > 0 AND captured_uses <= uses)"
CAPTURED = (
    "captured_uses IS NULL OR (captured_uses <= uses"
    " AND (captured_uses > 0 OR (captured_uses = 0 AND units_per_use IS NOT NULL)))"
)


def upgrade() -> None:
    op.add_column("reservations", sa.Column("feature", sa.String(64), nullable=True))
    op.add_column("reservations", sa.Column("quantity", sa.BigInteger(), nullable=True))
    op.add_column("reservations", sa.Column("units_per_use", sa.BigInteger(), nullable=True))
    op.create_check_constraint(op.f("ck_reservations_carry_complete"), "reservations", CARRIED)
    op.drop_constraint(op.f("ck_reservations_captured_within_held"), "reservations", type_="check")
    op.create_check_constraint(
        op.f("ck_reservations_captured_within_held"), "reservations", CAPTURED
    )


def downgrade() -> None:
    op.execute("UPDATE reservations SET captured_uses = NULL WHERE captured_uses = 0")
    op.drop_constraint(op.f("ck_reservations_captured_within_held"), "reservations", type_="check")
    op.create_check_constraint(
        op.f("ck_reservations_captured_within_held"), "reservations", CAPTURED_BEFORE
    )
    op.drop_constraint(op.f("ck_reservations_carry_complete"), "reservations", type_="check")
    op.drop_column("reservations", "units_per_use")
    op.drop_column("reservations", "quantity")
    op.drop_column("reservations", "feature")
