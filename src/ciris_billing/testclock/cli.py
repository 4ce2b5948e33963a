"""`ciris-billing test-clock show` and `ciris-billing test-clock advance --seconds N | --days N`:
the API's test-clock routes for the operator at the terminal (sandbox only, refused otherwise).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import click
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import clock
from ciris_billing.audit_trail import cli_operator
from ciris_billing.config import get_settings
from ciris_billing.db import create_engine
from ciris_billing.errors import BillingError
from ciris_billing.testclock import store
from ciris_billing.unit_of_work import unit_of_work


@click.group("test-clock")
def test_clock_commands() -> None:
    """The sandbox's test clock: the installation's "now", moved forward on request."""


def _run(work: Callable[[AsyncConnection], Awaitable[store.Clock]]) -> store.Clock:
    settings = get_settings()

    async def run() -> store.Clock:
        store.require_sandbox(settings)
        engine = create_engine(settings)
        try:
            async with unit_of_work(engine) as step:
                return await work(await step.connection())
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except BillingError as exc:
        raise click.ClickException(f"{exc.code}: {exc.detail}") from None


@test_clock_commands.command("show")
def show() -> None:
    """The installation's now and how far ahead of the real time it is (JSON)."""
    click.echo(json.dumps(_run(store.current).body(), indent=2))


@test_clock_commands.command("advance")
@click.option("--seconds", type=click.IntRange(min=1), default=None)
@click.option("--days", type=click.IntRange(min=1), default=None)
def advance(seconds: int | None, days: int | None) -> None:
    """Move the installation's clock forward by --seconds or --days (audited); returns once the
    running service's processes have seen it."""
    if (seconds is None) == (days is None):
        raise click.UsageError("Give one of --seconds or --days")
    amount = seconds if seconds is not None else (days or 0) * 86_400
    if amount > store.MAX_ADVANCE_SECONDS:
        raise click.BadParameter(f"at most {store.MAX_ADVANCE_SECONDS} seconds (10 years)")
    moved = _run(lambda conn: store.advance(conn, cli_operator(), amount))
    clock.set_offset(moved.offset_seconds)
    time.sleep(clock.SETTLE_SECONDS)  # the service's processes refresh their copy meanwhile
    click.echo(json.dumps(moved.body(), indent=2))
