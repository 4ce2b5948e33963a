"""portal link revocations: an account's portal links made before a time are void

Revision ID: 20261207_portal_revocations
Revises: 20261207_paid_confirmed
Create Date: 2026-12-07 14:00:00

- `portal_link_revocations`: one row per account whose portal links were revoked (API, CLI,
  console); a link made before `revoked_at` is refused (portal/links.py).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261207_portal_revocations"
down_revision: str | None = "20261207_paid_confirmed"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "portal_link_revocations",
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_portal_link_revocations_account_id_accounts"),
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_portal_link_revocations")),
    )


def downgrade() -> None:
    op.drop_table("portal_link_revocations")
