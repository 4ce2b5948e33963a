"""every operator action audited by door; uses a dispute is owed by reservations

Revision ID: 20261207_audit_owed
Revises: 20261205_console
Create Date: 2026-12-07 14:00:00

- `audit_trail.door`: the door an operator action came through (api, cli, console); every
  operator action is a row now, not only the console's (issue 21 finding 10).
- `credits.api_key_id`: the API key whose request wrote a ledger row (NULL: CLI, jobs).
- `reservations.owed_dispute_id`, `reservations.owed_uses`: paid uses a dispute could not hold
  because this reservation held them; moved into the dispute's hold when the reservation ends
  (issue 21 finding 2).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261207_audit_owed"
down_revision: str | None = "20261205_console"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "audit_trail",
        sa.Column("door", sa.String(16), nullable=False, server_default=sa.text("'console'")),
    )
    op.add_column("credits", sa.Column("api_key_id", sa.String(40)))
    op.add_column("reservations", sa.Column("owed_dispute_id", sa.String(40)))
    op.add_column(
        "reservations",
        sa.Column("owed_uses", sa.BigInteger(), nullable=False, server_default=sa.text("0")),
    )
    op.create_check_constraint(
        op.f("ck_reservations_owed_within_paid_held"),
        "reservations",
        "owed_uses >= 0 AND owed_uses <= paid_uses_held",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_reservations_owed_within_paid_held"), "reservations", type_="check")
    op.drop_column("reservations", "owed_uses")
    op.drop_column("reservations", "owed_dispute_id")
    op.drop_column("credits", "api_key_id")
    op.drop_column("audit_trail", "door")
