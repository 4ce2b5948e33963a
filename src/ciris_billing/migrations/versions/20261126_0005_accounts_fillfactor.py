"""accounts fillfactor: room on each page for HOT updates

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 08:15:00

Every charge updates its account's row; with free space on the page PostgreSQL keeps the new
version there (a HOT update: no new index entries). Only pages written from now on get the room
(no table rewrite here: `VACUUM FULL accounts` or pg_repack does it when convenient).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE accounts SET (fillfactor = 80)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE accounts RESET (fillfactor)")
