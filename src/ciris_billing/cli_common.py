"""What the CLI's command modules share: one committed transaction on the configured database,
JSON on stdout, and an operator action whose BillingError is the command's error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing import installation
from ciris_billing.config import get_settings
from ciris_billing.db import create_engine
from ciris_billing.errors import BillingError
from ciris_billing.payments.providers import PaymentConfigurationError, get_payment_provider
from ciris_billing.payments.providers.base import PaymentProvider

T = TypeVar("T")


def _with_connection(work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run `work` in one committed transaction on the configured database."""
    return asyncio.run(_with_connection_async(work))


def in_transaction(work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run `work` in one committed transaction; a BillingError is the command's error."""
    try:
        return _with_connection(work)
    except BillingError as exc:
        raise click.ClickException(f"{exc.code}: {exc.detail}") from None


async def _with_connection_async(work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    engine = create_engine(get_settings())
    try:
        async with engine.begin() as conn:
            return await work(conn)
    finally:
        await engine.dispose()


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _run_operator(work: Awaitable[T]) -> T:
    async def run() -> T:
        return await work

    try:
        return asyncio.run(run())
    except BillingError as exc:
        raise click.ClickException(f"{exc.code}: {exc.detail}") from None


async def _with_provider(
    work: Callable[[AsyncEngine, PaymentProvider], Awaitable[T]], *, delivers: bool = False
) -> T:
    """`delivers`: the sandbox's webhooks go to the inbox from this process (the worker's
    redelivery); a one-shot command's are left recorded for the jobs to send."""
    settings = get_settings()
    engine = create_engine(settings)
    deliver = None
    if delivers:
        from ciris_billing.webhooks.local_delivery import to_inbox

        deliver = to_inbox(engine, lambda: provider, settings.jobs_poll_seconds)
    try:
        stored = await installation.load(engine, settings)
        provider = get_payment_provider(settings, engine, stored, deliver)
    except PaymentConfigurationError as exc:
        await engine.dispose()
        raise click.ClickException(str(exc)) from None
    try:
        return await work(engine, provider)
    finally:
        await provider.aclose()
        await engine.dispose()
