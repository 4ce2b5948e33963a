"""Issue 21, finding 14: a PostgreSQL that refuses connections ("too many clients", SQLSTATE
53300) is a database outage like any other: 503 + Retry-After from the API (it answered 500,
81 times, when the server hit max_connections), and one clear line and a non-zero exit from
the CLI (`ciris-billing audit` died with a traceback).

Reproduced on the real server without starving anyone: a role of this test's own with a
CONNECTION LIMIT (the same SQLSTATE and path as max_connections), lowered to 0 while the
service runs, its connections ended, so every new one is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.support.api import identity, make_settings, running_app
from tests.support.cli import cli
from tests.support.postgres import pg_admin

WHO = identity("exhausted@example.com")


def _as_role(url: str, role: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{role}@{rest.split('@', 1)[1]}"


async def _end_sessions(admin_url: str, role: str) -> None:
    conn = await asyncpg.connect(admin_url, timeout=5)
    try:
        sql = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1"
        await conn.execute(sql, role)
    finally:
        await conn.close()


@pytest.fixture
async def limited_url(postgres_admin_url: str, fresh_database: str) -> AsyncIterator[str]:
    """`fresh_database` reached as a role of its own (CONNECTION LIMIT 4 to start)."""
    role = f"ciris_h21_limited_{uuid.uuid4().hex[:8]}"
    await pg_admin(postgres_admin_url, f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 4')
    await pg_admin(
        fresh_database,
        f'GRANT ALL ON SCHEMA public TO "{role}"; '
        f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"; '
        f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"',
    )
    try:
        yield _as_role(fresh_database, role)
    finally:
        await pg_admin(postgres_admin_url, f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
        await _end_sessions(postgres_admin_url, role)
        await pg_admin(fresh_database, f'DROP OWNED BY "{role}"')
        await pg_admin(postgres_admin_url, f'DROP ROLE "{role}"')


async def _refuse_connections(admin_url: str, role_url: str) -> None:
    """No new connection for the role (53300), and none of its connections left."""
    role = role_url.split("://", 1)[1].split("@", 1)[0]
    await pg_admin(admin_url, f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
    await _end_sessions(admin_url, role)


async def test_finding14_too_many_clients_is_503_with_retry_after(
    postgres_admin_url: str, limited_url: str
) -> None:
    settings = make_settings(limited_url, db_pool_size=2, db_connect_timeout_seconds=5.0)
    async with running_app(settings) as api:
        made = await api.post("/v1/billing/accounts", WHO, scope="admin")
        assert made.status_code == 201, made.text
        await _refuse_connections(postgres_admin_url, limited_url)
        with pytest.raises(asyncpg.TooManyConnectionsError):  # what the service meets
            await asyncpg.connect(limited_url, timeout=5)

        answers = []
        for _ in range(4):
            answers += [
                await api.post("/v1/billing/credits/check", WHO, scope="read"),  # fast path
                await api.post("/v1/billing/charges", WHO),  # fast path, a write
                await api.get(
                    f"/v1/billing/accounts/{WHO['oauth_provider']}/exhausted@example.com"
                ),
                await api.get("/v1/billing/reservations", **WHO),
            ]

        assert [a.status_code for a in answers] == [503] * len(answers), [a.text for a in answers]
        for answer in answers:
            assert answer.headers["Retry-After"] == "1"
            assert answer.json()["error"] == "database_unavailable"


@pytest.mark.parametrize(
    "args",
    [
        ("audit", "--ledger-only"),
        ("keys", "list"),
        ("audit-log",),
        ("reservations", "list"),
        ("export", "oauth:google", "exhausted@example.com"),
    ],
)
async def test_finding14_cli_prints_one_line_and_exits_non_zero(
    postgres_admin_url: str, limited_url: str, args: tuple[str, ...]
) -> None:
    await _refuse_connections(postgres_admin_url, limited_url)

    done = cli({"DATABASE_URL": limited_url, "PAYMENT_PROVIDER": "sandbox"}, *args)

    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    assert "too many connections" in errors[0], errors[0]


def test_finding14_cli_on_an_unreachable_database_prints_one_line() -> None:
    unreachable = "postgresql://postgres@127.0.0.1:1/nothing"

    done = cli({"DATABASE_URL": unreachable, "PAYMENT_PROVIDER": "sandbox"}, "audit")

    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    assert "cannot reach the database" in errors[0], errors[0]
