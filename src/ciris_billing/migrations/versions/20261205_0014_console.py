"""console: operator sessions, the audit trail, look-up indexes, the sandbox's card on receipts

Revision ID: 20261205_console
Revises: 20261205_auto_topup
Create Date: 2026-12-05 08:00:00

- `console_sessions`: server-side sessions of the operator console (the cookie's token is
  stored only as its SHA-256), each with its CSRF token, idle and absolute expiry.
- `audit_trail`: who did what in the console, when, before -> after; one row per confirmed
  action (its confirmation id unique: a double submit is applied once).
- Indexes for the console's look-ups: identity and email whatever their case, the day's
  charges (BRIN: cheap for the charge INSERT), purchases by time.
- `sandbox_payments.card_brand` / `card_last4`: the sandbox, like Stripe, reports the card that
  paid (never its number).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261205_console"
down_revision: str | None = "20261205_auto_topup"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("api_key_id", sa.String(40), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_keys.id"],
            name=op.f("fk_console_sessions_api_key_id_api_keys"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_console_sessions")),
    )
    op.create_index(
        op.f("ix_console_sessions_api_key_id"), "console_sessions", ["api_key_id"], unique=False
    )
    op.create_table(
        "audit_trail",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(100), nullable=False),
        sa.Column("api_key_id", sa.String(40), nullable=True),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=True),
        sa.Column("subject", sa.String(255), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("before", sa.JSON(), nullable=False),
        sa.Column("after", sa.JSON(), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_audit_trail_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_trail")),
        sa.UniqueConstraint("request_id", name=op.f("uq_audit_trail_request_id")),
    )
    op.create_index(
        op.f("ix_audit_trail_account_id_created_at"),
        "audit_trail",
        ["account_id", "created_at"],
        unique=False,
    )
    op.create_index(op.f("ix_audit_trail_created_at"), "audit_trail", ["created_at"], unique=False)
    op.create_index(
        "ix_accounts_lower_external_id", "accounts", [sa.text("lower(external_id)")], unique=False
    )
    op.create_index(
        "ix_accounts_lower_customer_email",
        "accounts",
        [sa.text("lower(customer_email)")],
        unique=False,
    )
    op.create_index(
        "ix_charges_created_at_brin",
        "charges",
        ["created_at"],
        unique=False,
        postgresql_using="brin",
    )
    op.create_index("ix_purchases_created_at", "purchases", ["created_at"], unique=False)
    op.add_column("sandbox_payments", sa.Column("card_brand", sa.String(32), nullable=True))
    op.add_column("sandbox_payments", sa.Column("card_last4", sa.String(4), nullable=True))


def downgrade() -> None:
    op.drop_column("sandbox_payments", "card_last4")
    op.drop_column("sandbox_payments", "card_brand")
    op.drop_index("ix_purchases_created_at", table_name="purchases")
    op.drop_index("ix_charges_created_at_brin", table_name="charges")
    op.drop_index("ix_accounts_lower_customer_email", table_name="accounts")
    op.drop_index("ix_accounts_lower_external_id", table_name="accounts")
    op.drop_index(op.f("ix_audit_trail_created_at"), table_name="audit_trail")
    op.drop_index(op.f("ix_audit_trail_account_id_created_at"), table_name="audit_trail")
    op.drop_table("audit_trail")
    op.drop_index(op.f("ix_console_sessions_api_key_id"), table_name="console_sessions")
    op.drop_table("console_sessions")
