"""reservations: holds of uses, captured into one charge, released, or expired at their TTL

Revision ID: 20261204_reservations
Revises: 0007_charges_idem_scope
Create Date: 2026-12-04 08:00:00

- `reservations`: one row per hold; its status moves held -> captured | released | expired once.
- `accounts.reserved_free_uses` / `reserved_paid_uses`: the uses active holds took out of
  free/paid_uses_remaining (apart from disputes' `held_uses`).
- `charges.reservation_id`: the reservation a charge captured (unique).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261204_reservations"
down_revision: str | None = "0007_charges_idem_scope"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for column in ("reserved_free_uses", "reserved_paid_uses"):
        op.add_column(
            "accounts",
            sa.Column(column, sa.BigInteger(), nullable=False, server_default=sa.text("0")),
        )
        op.create_check_constraint(
            op.f(f"ck_accounts_{column}_not_negative"), "accounts", f"{column} >= 0"
        )
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("api_key_id", sa.String(40), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("uses", sa.BigInteger(), nullable=False),
        sa.Column("free_uses_held", sa.BigInteger(), nullable=False),
        sa.Column("paid_uses_held", sa.BigInteger(), nullable=False),
        sa.Column("captured_uses", sa.BigInteger(), nullable=True),
        sa.Column("charge_id", sa.String(40), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("closed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("uses > 0", name=op.f("ck_reservations_uses_positive")),
        sa.CheckConstraint(
            "free_uses_held >= 0 AND paid_uses_held >= 0 "
            "AND free_uses_held + paid_uses_held = uses",
            name=op.f("ck_reservations_held_split_adds_up"),
        ),
        sa.CheckConstraint(
            "captured_uses IS NULL OR (captured_uses > 0 AND captured_uses <= uses)",
            name=op.f("ck_reservations_captured_within_held"),
        ),
        sa.CheckConstraint(
            "status IN ('held', 'captured', 'released', 'expired')",
            name=op.f("ck_reservations_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_reservations_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reservations")),
    )
    op.create_index(
        op.f("ix_reservations_account_id_created_at"),
        "reservations",
        ["account_id", "created_at"],
    )
    op.create_index(
        "ix_reservations_held_expires_at",
        "reservations",
        ["expires_at"],
        postgresql_where=sa.text("status = 'held'"),
    )
    op.add_column("charges", sa.Column("reservation_id", sa.String(40), nullable=True))
    op.create_unique_constraint(op.f("uq_charges_reservation_id"), "charges", ["reservation_id"])
    op.create_foreign_key(
        op.f("fk_charges_reservation_id_reservations"),
        "charges",
        "reservations",
        ["reservation_id"],
        ["id"],
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("fk_charges_reservation_id_reservations"), "charges", type_="foreignkey"
    )
    op.drop_constraint(op.f("uq_charges_reservation_id"), "charges", type_="unique")
    op.drop_column("charges", "reservation_id")
    op.drop_index("ix_reservations_held_expires_at", table_name="reservations")
    op.drop_index(op.f("ix_reservations_account_id_created_at"), table_name="reservations")
    op.drop_table("reservations")
    for column in ("reserved_paid_uses", "reserved_free_uses"):
        op.drop_constraint(op.f(f"ck_accounts_{column}_not_negative"), "accounts", type_="check")
        op.drop_column("accounts", column)
