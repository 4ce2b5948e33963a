"""test clock: the sandbox's offset of the installation's "now" (issue 23 item 8)

Revision ID: 20261207_test_clock
Revises: 20261207_lots
Create Date: 2026-12-07 16:45:00

- `test_clock`: at most one row (id 1), `offset_seconds` ahead of the real time (clock.py);
  no row means 0. Written only by the sandbox's advance (testclock/), read by every process.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261207_test_clock"
down_revision: str | None = "20261207_lots"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "test_clock",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("offset_seconds", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_test_clock_one_row")),
        sa.CheckConstraint("offset_seconds >= 0", name=op.f("ck_test_clock_forward_only")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_test_clock")),
    )


def downgrade() -> None:
    op.drop_table("test_clock")
