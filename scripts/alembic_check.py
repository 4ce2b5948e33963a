"""`alembic check` (models match migrations) on a fresh PostgreSQL database, for `make lint`.

A scratch database on TEST_POSTGRES_URL's server when it answers, else on an embedded server in
a temporary folder (ciris_billing.embedded). The database, or the server, is gone afterwards.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import uuid
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config

from ciris_billing.cli import migrate_database
from ciris_billing.embedded import embedded_postgres

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


async def admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=3)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def check(admin_url: str) -> None:
    name = f"ciris_billing_check_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin(admin_url, f'CREATE DATABASE "{name}"'))
    url = f"{admin_url.rpartition('/')[0]}/{name}"
    try:
        migrate_database(url)
        config = Config()
        config.set_main_option("script_location", "ciris_billing:migrations")
        config.attributes["database_url"] = url
        command.check(config)  # raises when the models and the migrations differ
    finally:
        asyncio.run(admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def main() -> None:
    try:
        asyncio.run(admin(ADMIN_URL, "SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        with (
            tempfile.TemporaryDirectory(prefix="ciris-billing-check-") as tmp,
            embedded_postgres(Path(tmp) / "pgdata", database="postgres") as server,
        ):
            check(server.url("postgres"))
        return
    check(ADMIN_URL)


if __name__ == "__main__":
    main()
    print("alembic check: the models match the migrations.", file=sys.stderr)
