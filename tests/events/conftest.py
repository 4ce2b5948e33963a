"""The in-process app with webhook URLs on loopback allowed (the receiver is on 127.0.0.1)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.support.api import Api, make_settings, running_app


@pytest.fixture
async def hooks_api(database_url: str) -> AsyncIterator[Api]:
    settings = make_settings(
        database_url,
        rate_limit_account_per_minute=60_000,
        allow_private_webhook_urls=True,
        webhook_timeout_seconds=2.0,
    )
    async with running_app(settings) as api:
        yield api
