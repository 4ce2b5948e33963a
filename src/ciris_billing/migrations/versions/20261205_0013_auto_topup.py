"""auto top-up: saved cards, the account's settings, one top-up per balance crossing

Revision ID: 20261205_auto_topup
Revises: 20261205_events
Create Date: 2026-12-05 09:00:00

- `payment_customers`: the provider's customer of an account.
- `auto_topup_settings`: the account's saved card (provider ids, brand, last 4 only) and
  whether auto top-up is on; `consecutive_failures` switches it off.
- `auto_topups`: one row per balance.low crossing acted on (unique), at most one in flight per
  account (a unique partial index), each paying one purchase.
- `purchases.save_card`: the payer asked to keep the card for auto top-up.
- The sandbox's own customers and saved cards, and the saved-card columns of its payments.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261205_auto_topup"
down_revision: str | None = "20261205_events"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column(
        "purchases",
        sa.Column("save_card", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )
    op.create_table(
        "payment_customers",
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("customer_id", sa.String(255), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_payment_customers_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("account_id", "provider", name=op.f("pk_payment_customers")),
        sa.UniqueConstraint(
            "provider", "customer_id", name=op.f("uq_payment_customers_provider_customer_id")
        ),
    )
    op.create_table(
        "auto_topup_settings",
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("customer_id", sa.String(255), nullable=False),
        sa.Column("payment_method_id", sa.String(255), nullable=True),
        sa.Column("card_brand", sa.String(32), nullable=True),
        sa.Column("card_last4", sa.String(4), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("enabled_at", TS, nullable=True),
        sa.Column(
            "consecutive_failures", sa.Integer(), nullable=False, server_default=sa.text("0")
        ),
        sa.Column("disabled_reason", sa.String(200), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            "NOT enabled OR payment_method_id IS NOT NULL",
            name=op.f("ck_auto_topup_settings_card_when_enabled"),
        ),
        sa.CheckConstraint(
            "consecutive_failures >= 0", name=op.f("ck_auto_topup_settings_failures_not_negative")
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_auto_topup_settings_account_id_accounts"),
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_auto_topup_settings")),
    )
    op.create_table(
        "auto_topups",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("crossing_event_id", sa.String(40), nullable=False),
        sa.Column("status", sa.String(24), nullable=False),
        sa.Column("purchase_id", sa.String(40), nullable=False),
        sa.Column("payment_id", sa.String(255), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", TS, nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("failure_message", sa.String(500), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'succeeded', 'failed', 'requires_action', "
            "'skipped')",
            name=op.f("ck_auto_topups_status_known"),
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_auto_topups_attempts_not_negative")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_auto_topups_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auto_topups")),
        sa.UniqueConstraint("crossing_event_id", name=op.f("uq_auto_topups_crossing_event_id")),
        sa.UniqueConstraint("purchase_id", name=op.f("uq_auto_topups_purchase_id")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_auto_topups_idempotency_key")),
    )
    # At most one top-up in flight per account, by construction.
    op.create_index(
        "uq_auto_topups_in_flight",
        "auto_topups",
        ["account_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('pending', 'processing')"),
    )
    op.create_index(
        op.f("ix_auto_topups_account_id_created_at"), "auto_topups", ["account_id", "created_at"]
    )
    # The sandbox's saved cards.
    op.add_column("sandbox_payments", sa.Column("customer_id", sa.String(64), nullable=True))
    op.add_column(
        "sandbox_payments",
        sa.Column("save_card", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )
    op.add_column("sandbox_payments", sa.Column("payment_method_id", sa.String(64), nullable=True))
    op.add_column(
        "sandbox_payments",
        sa.Column("off_session", sa.Boolean(), nullable=False, server_default=sa.text("false")),
    )
    op.create_index(op.f("ix_sandbox_payments_customer_id"), "sandbox_payments", ["customer_id"])
    op.create_table(
        "sandbox_customers",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sandbox_customers")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_sandbox_customers_idempotency_key")),
    )
    op.create_table(
        "sandbox_payment_methods",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(64), nullable=False),
        sa.Column("brand", sa.String(32), nullable=False),
        sa.Column("last4", sa.String(4), nullable=False),
        sa.Column("behaviour", sa.String(32), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("attached_at", TS, nullable=True),
        sa.CheckConstraint(
            "behaviour IN ('succeeds', 'declined', 'authentication_required')",
            name=op.f("ck_sandbox_payment_methods_behaviour_known"),
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"],
            ["sandbox_customers.id"],
            name=op.f("fk_sandbox_payment_methods_customer_id_sandbox_customers"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sandbox_payment_methods")),
    )


def downgrade() -> None:
    op.drop_table("sandbox_payment_methods")
    op.drop_table("sandbox_customers")
    op.drop_index(op.f("ix_sandbox_payments_customer_id"), table_name="sandbox_payments")
    for column in ("off_session", "payment_method_id", "save_card", "customer_id"):
        op.drop_column("sandbox_payments", column)
    op.drop_index(op.f("ix_auto_topups_account_id_created_at"), table_name="auto_topups")
    op.drop_index("uq_auto_topups_in_flight", table_name="auto_topups")
    op.drop_table("auto_topups")
    op.drop_table("auto_topup_settings")
    op.drop_table("payment_customers")
    op.drop_column("purchases", "save_card")
