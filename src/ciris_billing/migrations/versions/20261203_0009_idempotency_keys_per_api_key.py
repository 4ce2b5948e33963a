"""idempotency keys scoped to the API key that sent them

Revision ID: 0007_charges_idem_scope
Revises: 0007_jobs_queue
Create Date: 2026-12-02 08:30:00

SPEC.md: the same Idempotency-Key from two API keys means two different requests. The key's
place (`idempotency_keys`, and the key column on `charges`) gains the API key's id, part of the
primary key / unique constraint. Rows from before this revision get LEGACY_SCOPE (''): which API
key sent them is unknown, so no request replays them; their keys stay taken (a reuse is a 409,
never a second effect). Keys of earlier charges are copied into `idempotency_keys` as well (an
empty response), so the charge statement's one probe of that table also refuses them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007_charges_idem_scope"
down_revision: str | None = "0007_jobs_queue"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "idempotency_keys",
        sa.Column("api_key_id", sa.String(length=40), nullable=False, server_default=""),
    )
    op.alter_column("idempotency_keys", "api_key_id", server_default=None)
    op.drop_constraint("pk_idempotency_keys", "idempotency_keys", type_="primary")
    op.create_primary_key("pk_idempotency_keys", "idempotency_keys", ["api_key_id", "key"])

    op.add_column("charges", sa.Column("api_key_id", sa.String(length=40), nullable=True))
    op.execute("UPDATE charges SET api_key_id = '' WHERE idempotency_key IS NOT NULL")
    op.drop_constraint("uq_charges_idempotency_key", "charges", type_="unique")
    op.create_unique_constraint(
        "uq_charges_api_key_id_idempotency_key", "charges", ["api_key_id", "idempotency_key"]
    )
    op.execute(
        """
        INSERT INTO idempotency_keys (api_key_id, key, fingerprint, response_status,
                                      response_body, created_at)
        SELECT '', idempotency_key, coalesce(request_fingerprint, ''), 0, '', created_at
        FROM charges WHERE idempotency_key IS NOT NULL
        ON CONFLICT DO NOTHING
        """
    )


def downgrade() -> None:
    # Keys become global again: of several uses of one key (by different API keys), the
    # earliest is kept.
    op.execute(
        """
        DELETE FROM idempotency_keys k USING idempotency_keys e
        WHERE k.key = e.key AND (k.created_at, k.api_key_id) > (e.created_at, e.api_key_id)
        """
    )
    op.execute(
        """
        DELETE FROM idempotency_keys k USING charges c
        WHERE k.key = c.idempotency_key AND k.response_status = 0 AND k.response_body = ''
        """
    )
    op.drop_constraint("uq_charges_api_key_id_idempotency_key", "charges", type_="unique")
    op.execute(
        """
        UPDATE charges c SET idempotency_key = NULL
        FROM charges e
        WHERE c.idempotency_key = e.idempotency_key AND (c.created_at, c.id) > (e.created_at, e.id)
        """
    )
    op.create_unique_constraint("uq_charges_idempotency_key", "charges", ["idempotency_key"])
    op.drop_column("charges", "api_key_id")
    op.drop_constraint("pk_idempotency_keys", "idempotency_keys", type_="primary")
    op.create_primary_key("pk_idempotency_keys", "idempotency_keys", ["key"])
    op.drop_column("idempotency_keys", "api_key_id")
