"""background jobs: procrastinate's queue, the inbox's retry time, the purchase's last check

Revision ID: 0007_jobs_queue
Revises: 20261203_secrets
Create Date: 2026-12-02 09:00:00

The job queue (jobs.py) is procrastinate's: its tables, functions and triggers, as the pinned
procrastinate release ships them (`procrastinate/sql/schema.sql`). Upgrading procrastinate
means a migration that applies that release's own files in `procrastinate/sql/migrations`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from procrastinate.schema import SchemaManager
from sqlalchemy.util import await_only

revision: str = "0007_jobs_queue"
down_revision: str | None = "20261203_secrets"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _execute_script(sql: str) -> None:
    """Several statements (function bodies included) at once: the driver's simple query
    protocol, inside the migration's transaction."""
    raw = op.get_bind().connection.dbapi_connection
    assert raw is not None
    await_only(raw.driver_connection.execute(sql))


def upgrade() -> None:
    op.add_column("webhook_events", sa.Column("next_attempt_at", sa.DateTime(timezone=True)))
    op.add_column("purchases", sa.Column("reconciled_at", sa.DateTime(timezone=True)))
    _execute_script(SchemaManager.get_schema())


def downgrade() -> None:
    _execute_script(
        """
        DROP TABLE IF EXISTS procrastinate_periodic_defers, procrastinate_events,
            procrastinate_jobs, procrastinate_workers CASCADE;
        DROP TYPE IF EXISTS procrastinate_job_status, procrastinate_job_event_type,
            procrastinate_job_to_defer_v1 CASCADE;
        DO $$
        DECLARE f record;
        BEGIN
            FOR f IN SELECT oid::regprocedure AS sig FROM pg_proc
                     WHERE proname LIKE 'procrastinate%' LOOP
                EXECUTE 'DROP FUNCTION IF EXISTS ' || f.sig || ' CASCADE';
            END LOOP;
        END $$;
        """
    )
    op.drop_column("purchases", "reconciled_at")
    op.drop_column("webhook_events", "next_attempt_at")
