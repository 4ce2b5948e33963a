"""lots: the expiring notice's marker and the void's instant

Revision ID: 20261207_lots_expiring
Revises: 20261207_test_clock
Create Date: 2026-12-07 18:00:00

Issue 23 item 4: `credits.expiring` goes out once per lot, CREDITS_EXPIRING_NOTICE_DAYS before
its expiry (`expiring_notified_at`: when it went out). Item 6: a lot voided while open holds
name it stays in its wallet until they end (`voided_at`: when it was voided; the expiry job
closes it, accounts/lot_expiry.py), found by a partial index.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261207_lots_expiring"
down_revision: str | None = "20261207_test_clock"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("lots", sa.Column("expiring_notified_at", sa.DateTime(timezone=True)))
    op.add_column("lots", sa.Column("voided_at", sa.DateTime(timezone=True)))
    op.create_index(
        "ix_lots_open_voided_at",
        "lots",
        ["voided_at"],
        postgresql_where=sa.text("status = 'active' AND voided_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_lots_open_voided_at", table_name="lots")
    op.drop_column("lots", "voided_at")
    op.drop_column("lots", "expiring_notified_at")
