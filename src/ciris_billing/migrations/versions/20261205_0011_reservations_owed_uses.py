"""owed uses: what a refund or a lost dispute could not take because reservations held it

Revision ID: 20261205_owed_uses
Revises: 20261204_reservations
Create Date: 2026-12-05 08:00:00

- `accounts.refund_owed_uses`: paid uses a refund or a lost dispute should have taken back but
  found held by reservations; releasing or expiring those holds pays them off first
  (accounts/reservations.py), so a refunded use never comes back to the user. Never more than
  the account's reserved paid uses (a captured hold's owed uses were spent: shortfall).
- `disputes.reserved_uses`: the purchase's unused uses a dispute could not hold when it opened
  because reservations held them; a lost dispute takes them like a refund.
- credit kind `owed_taken`: the ledger row of owed uses paid off when a hold gives uses back.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261205_owed_uses"
down_revision: str | None = "20261204_reservations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_CREDIT_KINDS = (
    "free_grant",
    "initial_balance",
    "purchase",
    "grant",
    "adjustment",
    "refund",
    "dispute_hold",
    "dispute_lost",
    "dispute_won",
)
CREDIT_KINDS = (*OLD_CREDIT_KINDS, "owed_taken")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN (" + ", ".join(f"'{v}'" for v in values) + ")"


def upgrade() -> None:
    op.add_column(
        "accounts",
        sa.Column("refund_owed_uses", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_check_constraint(
        op.f("ck_accounts_refund_owed_uses_not_negative"), "accounts", "refund_owed_uses >= 0"
    )
    op.create_check_constraint(
        op.f("ck_accounts_refund_owed_uses_within_reserved"),
        "accounts",
        "refund_owed_uses <= reserved_paid_uses",
    )
    op.add_column(
        "disputes",
        sa.Column("reserved_uses", sa.BigInteger(), nullable=False, server_default="0"),
    )
    op.create_check_constraint(
        op.f("ck_disputes_reserved_uses_not_negative"), "disputes", "reserved_uses >= 0"
    )
    op.drop_constraint(op.f("ck_credits_kind_known"), "credits", type_="check")
    op.create_check_constraint("kind_known", "credits", _in("kind", CREDIT_KINDS))


def downgrade() -> None:
    op.drop_constraint(op.f("ck_credits_kind_known"), "credits", type_="check")
    # The rows stay (the ledger must still add up), as the adjustments they are.
    op.execute("UPDATE credits SET kind = 'adjustment' WHERE kind = 'owed_taken'")
    op.create_check_constraint("kind_known", "credits", _in("kind", OLD_CREDIT_KINDS))
    op.drop_constraint(op.f("ck_disputes_reserved_uses_not_negative"), "disputes", type_="check")
    op.drop_column("disputes", "reserved_uses")
    op.drop_constraint(
        op.f("ck_accounts_refund_owed_uses_within_reserved"), "accounts", type_="check"
    )
    op.drop_constraint(op.f("ck_accounts_refund_owed_uses_not_negative"), "accounts", type_="check")
    op.drop_column("accounts", "refund_owed_uses")
