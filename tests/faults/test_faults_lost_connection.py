"""A pooled connection whose server side ended while it sat idle (a terminated backend, a
restart) is found lost only by the next statement written to it. A credit check changes
nothing, so its statement is sent again on a new connection: the check is answered, not 503.
A charge's is not (it may have committed before the answer was lost): test_faults_read_only.py
and the failover tests cover its 503."""

from __future__ import annotations

import subprocess
from urllib.parse import urlsplit

from tests.support.api import identity, make_settings, running_app


def _end_connections_now(admin_url: str, database: str) -> None:
    """End every connection to `database` and wait until their backends are gone, blocking:
    the service's event loop does not run meanwhile, so it has not seen them close."""
    sql = (
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "  # noqa: S608 (ours)
        f"WHERE datname = '{database}' AND pid <> pg_backend_pid()"
    )
    subprocess.run(
        ["/usr/bin/psql", admin_url, "-Atqc", sql], check=True, capture_output=True, timeout=30
    )


async def test_a_check_on_a_connection_ended_while_idle_is_answered(
    fresh_database: str, postgres_admin_url: str
) -> None:
    database = urlsplit(fresh_database).path.lstrip("/")
    # One connection per pool: the check gets the connection that was ended.
    async with running_app(make_settings(fresh_database, db_pool_size=1)) as api:
        users = [identity(f"idle-{n}@x.y") for n in range(5)]
        for user in users:
            assert (await api.post("/v1/billing/charges", user)).status_code == 201
        for user in users:
            _end_connections_now(postgres_admin_url, database)
            check = await api.post("/v1/billing/credits/check", user)
            assert check.status_code == 200, check.text
            assert check.json()["free_uses_remaining"] == 2
        report = await api.audit()
        assert report.clean, report
