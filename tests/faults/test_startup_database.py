"""A worker that starts while its database is away waits for it, instead of failing start-up.

Found by CI (tests/faults/test_automatic_recovery.py, connections killed every 0.3 s): the
second worker of `serve --workers 2` was still starting when its database connection was
terminated; reading the installation's secrets failed, the worker's start-up failed, and uvicorn
stopped the whole service, so nothing recovered the purchases the test then waited for. A
database restart, or a failover, during a deploy or a worker's restart does the same.
Here a TCP proxy between the app and PostgreSQL refuses every connection while the app starts,
and lets them through 1.5 s later.
"""

from __future__ import annotations

import asyncio

import httpx

from ciris_billing.app import create_app
from tests.support.api import make_settings
from tests.support.faults import proxied_database

AWAY_SECONDS = 1.5


async def test_a_worker_starting_while_the_database_is_away_waits_for_it(
    fresh_database: str,
) -> None:
    with proxied_database(fresh_database) as (proxy, via_proxy):
        proxy.down()
        app = create_app(make_settings(via_proxy, db_connect_timeout_seconds=2.0))

        async def back_soon() -> None:
            await asyncio.sleep(AWAY_SECONDS)
            proxy.up()

        coming_back = asyncio.create_task(back_soon())
        async with asyncio.timeout(60), app.router.lifespan_context(app):
            assert coming_back.done(), "start-up finished while the database was away"
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://b.test") as http:
                health = await http.get("/health")
        await coming_back
    assert health.status_code == 200, health.text
