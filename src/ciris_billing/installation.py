"""Installation secrets: made once per installation, stored in the database, shared by all.

There is no public default secret anywhere. The first process to start (any worker, instance,
or CLI command) generates each secret and inserts it with `INSERT ... ON CONFLICT DO NOTHING`;
every process then reads the stored value back, so all workers, instances and restarts on one
database agree without configuration. An environment variable, when set, still wins
(SANDBOX_WEBHOOK_SECRET, CHECKOUT_LINK_SECRET) - for several databases that must agree.

- `sandbox_webhook_secret`: signs the sandbox's webhooks (Stripe's scheme);
- `checkout_link_secret`: signs the buy links in 402 answers;
- `portal_link_secret`: signs the customer portal links (portal/links.py);
- `console_secret`: signs the console login form's CSRF token (console/sessions.py);
- `erasure_key`: keys the digest an erased identity is kept as (accounts/erasure.py). No
  variable overrides it: the digests already stored are only as findable as this key is stable,
  so it lives (and is backed up) with the data it protects.

They are read when a process starts. A database that is away then (restarting, failing over,
its connections being cut) is waited for, up to STARTUP_WAIT_SECONDS: a worker that gave up at
once failed its start-up, and uvicorn then stopped the whole service
(tests/faults/test_startup_database.py).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.config import Settings
from ciris_billing.database_errors import connection_unusable
from ciris_billing.db import insert_or_ignore, installation_secrets, utcnow
from ciris_billing.observability import log

# How long a starting process waits for an unreachable database before its start-up fails.
STARTUP_WAIT_SECONDS = 60.0

# The names the secrets are stored under (not secrets themselves).
SANDBOX_WEBHOOK_SECRET = "sandbox_webhook_secret"  # noqa: S105
CHECKOUT_LINK_SECRET = "checkout_link_secret"  # noqa: S105
ERASURE_KEY = "erasure_key"
PORTAL_LINK_SECRET = "portal_link_secret"  # noqa: S105
CONSOLE_SECRET = "console_secret"  # noqa: S105

GENERATORS: dict[str, Callable[[], str]] = {
    SANDBOX_WEBHOOK_SECRET: lambda: "whsec_" + secrets.token_urlsafe(32),
    CHECKOUT_LINK_SECRET: lambda: secrets.token_urlsafe(32),
    ERASURE_KEY: lambda: secrets.token_urlsafe(32),
    PORTAL_LINK_SECRET: lambda: secrets.token_urlsafe(32),
    CONSOLE_SECRET: lambda: secrets.token_urlsafe(32),
}


@dataclass(frozen=True, slots=True)
class InstallationSecrets:
    sandbox_webhook_secret: str
    checkout_link_secret: bytes
    erasure_key: bytes
    portal_link_secret: bytes
    console_secret: bytes

    def __repr__(self) -> str:  # never in a log or a traceback
        return "InstallationSecrets(...)"


async def stored(conn: AsyncConnection, *names: str) -> dict[str, str]:
    """The stored secrets `names`, each generated and stored first if missing."""
    for name in names:
        # Safe when processes start together: one INSERT wins, the others do nothing (after
        # waiting for the winner's transaction) and read the winner's value below.
        await conn.execute(
            insert_or_ignore(installation_secrets).values(
                name=name, value=GENERATORS[name](), created_at=utcnow()
            )
        )
    rows = await conn.execute(
        select(installation_secrets.c.name, installation_secrets.c.value).where(
            installation_secrets.c.name.in_(names)
        )
    )
    return {row.name: row.value for row in rows}


async def erasure_key(conn: AsyncConnection) -> bytes:
    return (await stored(conn, ERASURE_KEY))[ERASURE_KEY].encode()


async def load(engine: AsyncEngine, settings: Settings) -> InstallationSecrets:
    """The installation's secrets (an environment variable, when set, wins); waits for a
    database that is away, up to STARTUP_WAIT_SECONDS."""
    deadline, delay = time.monotonic() + STARTUP_WAIT_SECONDS, 0.25
    while True:
        try:
            async with engine.begin() as conn:
                values = await stored(conn, *GENERATORS)
            break
        except Exception as exc:
            # Safe to run again: the inserts are INSERT ... ON CONFLICT DO NOTHING, and a
            # transaction cut off committed nothing or all of it.
            if not connection_unusable(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("database_unavailable_at_start", retry_in_seconds=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    webhook = values[SANDBOX_WEBHOOK_SECRET]
    if settings.sandbox_webhook_secret is not None:
        webhook = settings.sandbox_webhook_secret.get_secret_value()
    link = values[CHECKOUT_LINK_SECRET]
    if settings.checkout_link_secret is not None:
        link = settings.checkout_link_secret.get_secret_value()
    return InstallationSecrets(
        webhook,
        link.encode(),
        values[ERASURE_KEY].encode(),
        values[PORTAL_LINK_SECRET].encode(),
        values[CONSOLE_SECRET].encode(),
    )
