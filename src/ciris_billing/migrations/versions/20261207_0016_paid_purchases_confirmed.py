"""paid purchases confirmed: the payer's confirmation mark, the sandbox's webhooks redelivered

Revision ID: 20261207_paid_confirmed
Revises: 20261207_audit_owed
Create Date: 2026-12-07 14:00:00

- `purchases.paid_seen_at`: the payment page (or the agent client) asked the service to confirm
  a payment the provider had told it succeeded; reconcile asks about it at once.
- `sandbox_webhook_events`: the sandbox's webhooks until acknowledged, redelivered with backoff
  as Stripe does (issue 22 item 4).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261207_paid_confirmed"
down_revision: str | None = "20261207_audit_owed"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("purchases", sa.Column("paid_seen_at", sa.DateTime(timezone=True)))
    op.create_table(
        "sandbox_webhook_events",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("payment_id", sa.String(64), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True)),
        sa.ForeignKeyConstraint(
            ["payment_id"],
            ["sandbox_payments.id"],
            name=op.f("fk_sandbox_webhook_events_payment_id_sandbox_payments"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sandbox_webhook_events")),
    )
    op.create_index(
        "ix_sandbox_webhook_events_due",
        "sandbox_webhook_events",
        ["next_attempt_at"],
        postgresql_where=sa.text("delivered_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_sandbox_webhook_events_due", table_name="sandbox_webhook_events")
    op.drop_table("sandbox_webhook_events")
    op.drop_column("purchases", "paid_seen_at")
