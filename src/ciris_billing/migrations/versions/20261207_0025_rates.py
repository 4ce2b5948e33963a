"""rates: a feature's quantity turned into uses (`up` or `carry`), the carry on the account row

Revision ID: 20261207_rates
Revises: 20261207_revenue_rollups
Create Date: 2026-12-07 20:30:00

Issue 24 item 3. `rates` (feature, units_per_use, rounding); the account row keeps each
feature's carried remainder (`carry_features`, `carry_left`, parallel arrays) so the one
statement that locks the row computes and writes it (ledger/rates.py); charges record
`feature` and `quantity`, and a `carry` charge that completes no use records 0 uses.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "20261207_rates"
down_revision: str | None = "20261207_revenue_rollups"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rates",
        sa.Column("feature", sa.String(64), nullable=False),
        sa.Column("units_per_use", sa.BigInteger(), nullable=False),
        sa.Column("rounding", sa.String(8), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("units_per_use > 0", name=op.f("ck_rates_units_positive")),
        sa.CheckConstraint("rounding IN ('up', 'carry')", name=op.f("ck_rates_rounding_known")),
        sa.CheckConstraint(
            "feature ~ '^[a-z0-9][a-z0-9_.:-]{0,63}$'", name=op.f("ck_rates_feature_shape")
        ),
        sa.PrimaryKeyConstraint("feature", name=op.f("pk_rates")),
    )
    empty = sa.text("'{}'")
    op.add_column(
        "accounts",
        sa.Column(
            "carry_features", postgresql.ARRAY(sa.String(64)), server_default=empty, nullable=False
        ),
    )
    op.add_column(
        "accounts",
        sa.Column(
            "carry_left", postgresql.ARRAY(sa.BigInteger()), server_default=empty, nullable=False
        ),
    )
    op.add_column("charges", sa.Column("feature", sa.String(64), nullable=True))
    op.add_column("charges", sa.Column("quantity", sa.BigInteger(), nullable=True))
    op.drop_constraint(op.f("ck_charges_uses_positive"), "charges", type_="check")
    op.create_check_constraint(
        op.f("ck_charges_uses_positive"), "charges", "uses > 0 OR feature IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DELETE FROM charges WHERE uses = 0")
    op.drop_constraint(op.f("ck_charges_uses_positive"), "charges", type_="check")
    op.create_check_constraint(op.f("ck_charges_uses_positive"), "charges", "uses > 0")
    op.drop_column("charges", "quantity")
    op.drop_column("charges", "feature")
    op.drop_column("accounts", "carry_left")
    op.drop_column("accounts", "carry_features")
    op.drop_table("rates")
