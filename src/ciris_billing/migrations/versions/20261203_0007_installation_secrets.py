"""installation secrets, sandbox disputes as the sandbox's own state, keyed erasure digests

Revision ID: 20261203_secrets
Revises: 0006
Create Date: 2026-12-03 08:00:00

- `installation_secrets`: secrets made once per installation (installation.py); the erasure
  key is made here, because the rows below are keyed with it.
- `accounts.erased_digest`: an erased account was `external_id = "erased:" + SHA-256(provider
  NUL external_id)`, unsalted (reversible from a list of emails), and unique, so an identity
  could be erased only once. Now the digest is `HMAC(erasure key, that SHA-256)` in its own
  column and `external_id = "erased:" + account id`. Existing rows are keyed in place (their
  unsalted digest is the HMAC's input, so no identity is needed); the unsalted one is gone.
- `sandbox_disputes`: the sandbox's disputes move out of `sandbox_payments` into their own table.
"""

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "20261203_secrets"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "installation_secrets",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_installation_secrets")),
    )
    conn = op.get_bind()
    conn.execute(
        sa.text(
            "INSERT INTO installation_secrets (name, value, created_at) "
            "VALUES ('erasure_key', :value, :now) ON CONFLICT DO NOTHING"
        ),
        {"value": secrets.token_urlsafe(32), "now": datetime.now(UTC)},
    )
    key = conn.execute(
        sa.text("SELECT value FROM installation_secrets WHERE name = 'erasure_key'")
    ).scalar_one()

    op.add_column("accounts", sa.Column("erased_digest", sa.String(64), nullable=True))
    op.create_index(
        op.f("ix_accounts_oauth_provider_erased_digest"),
        "accounts",
        ["oauth_provider", "erased_digest"],
        postgresql_where=sa.text("erased_digest IS NOT NULL"),
    )
    erased = conn.execute(
        sa.text(
            "SELECT id, external_id FROM accounts "
            "WHERE erased_at IS NOT NULL AND external_id LIKE 'erased:%'"
        )
    ).all()
    for account_id, external_id in erased:
        unsalted = external_id.removeprefix("erased:")
        keyed = hmac.new(key.encode(), unsalted.encode(), hashlib.sha256).hexdigest()
        conn.execute(
            sa.text(
                "UPDATE accounts SET erased_digest = :digest, external_id = :external_id "
                "WHERE id = :id"
            ),
            {"digest": keyed, "external_id": f"erased:{account_id}", "id": account_id},
        )

    op.create_table(
        "sandbox_disputes",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("payment_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["payment_id"],
            ["sandbox_payments.id"],
            name=op.f("fk_sandbox_disputes_payment_id_sandbox_payments"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sandbox_disputes")),
        sa.UniqueConstraint("payment_id", name=op.f("uq_sandbox_disputes_payment_id")),
    )
    op.execute(
        "INSERT INTO sandbox_disputes "
        "(id, payment_id, status, amount_minor, currency, created_at, updated_at) "
        "SELECT dispute_id, id, dispute_status, amount_minor, currency, updated_at, updated_at "
        "FROM sandbox_payments WHERE dispute_id IS NOT NULL"
    )
    op.drop_column("sandbox_payments", "dispute_status")
    op.drop_column("sandbox_payments", "dispute_id")


def downgrade() -> None:
    op.add_column("sandbox_payments", sa.Column("dispute_id", sa.String(64), nullable=True))
    op.add_column("sandbox_payments", sa.Column("dispute_status", sa.String(32), nullable=True))
    op.execute(
        "UPDATE sandbox_payments p SET dispute_id = d.id, dispute_status = d.status "
        "FROM sandbox_disputes d WHERE d.payment_id = p.id"
    )
    op.drop_table("sandbox_disputes")
    # The keyed digests cannot be turned back into unsalted ones (that is the point): erased
    # accounts keep `erased:<account id>` and can no longer be found by their identity.
    op.drop_index(op.f("ix_accounts_oauth_provider_erased_digest"), table_name="accounts")
    op.drop_column("accounts", "erased_digest")
    op.drop_table("installation_secrets")
