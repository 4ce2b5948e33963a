"""`ciris-billing auto-topup show|on|off|remove-card IDENTITY`: the API's twins for operators.

IDENTITY is `PROVIDER/EXTERNAL_ID` (e.g. `oauth:google/user@example.com`) or the two words.
Each prints the account's auto top-up as JSON, as `GET .../auto_topup` answers it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing import audit_trail, installation
from ciris_billing.accounts import service as accounts
from ciris_billing.audit_trail import Entry
from ciris_billing.autotopup import cards
from ciris_billing.autotopup.routes import auto_topup_body
from ciris_billing.cli_lookup import parse_identity
from ciris_billing.config import get_settings
from ciris_billing.db import create_engine
from ciris_billing.errors import BillingError
from ciris_billing.payments.providers import PaymentConfigurationError, get_payment_provider
from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.pricing import Pricing
from ciris_billing.unit_of_work import UnitOfWork, unit_of_work

Change = Callable[[UnitOfWork, PaymentProvider, str], Awaitable[Any]]


def _run(identity_words: tuple[str, ...], change: Change | None) -> None:
    identity = parse_identity(identity_words)
    settings = get_settings()

    async def work() -> dict[str, Any]:
        engine: AsyncEngine = create_engine(settings)
        try:
            provider = get_payment_provider(
                settings, engine, await installation.load(engine, settings)
            )
        except PaymentConfigurationError as exc:
            await engine.dispose()
            raise click.ClickException(str(exc)) from None
        try:
            async with unit_of_work(engine) as step:
                account = await accounts.get_account(await step.connection(), identity)
                if change is not None:
                    await change(step, provider, account.id)
                return await auto_topup_body(
                    await step.connection(), Pricing.from_settings(settings), settings, account
                )
        finally:
            await provider.aclose()
            await engine.dispose()

    try:
        body = asyncio.run(work())
    except BillingError as exc:
        raise click.ClickException(f"{exc.code}: {exc.detail}") from None
    click.echo(json.dumps(body, indent=2))


@click.group("auto-topup")
def auto_topup() -> None:
    """An account's auto top-up (its saved card pays a pack when the balance runs low)."""


identity_argument = click.argument("identity", nargs=-1, required=True)


@auto_topup.command("show")
@identity_argument
def show(identity: tuple[str, ...]) -> None:
    """On or off, the saved card (brand, last 4), this month's top-ups against the cap."""
    _run(identity, None)


async def _switch(step: UnitOfWork, enabled: bool, account_id: str) -> None:
    conn = await step.connection()
    await cards.set_enabled(conn, account_id, enabled)
    action = "auto_topup_on" if enabled else "auto_topup_off"
    await audit_trail.record_action(
        conn, audit_trail.cli_operator(), Entry(action, account_id, None, {}, {}, {})
    )


async def _remove_card(step: UnitOfWork, provider: PaymentProvider, account_id: str) -> None:
    await cards.remove_card(step, provider, account_id)
    entry = Entry("remove_card", account_id, None, {}, {}, {})
    await audit_trail.record_action(await step.connection(), audit_trail.cli_operator(), entry)


@auto_topup.command("on")
@identity_argument
def switch_on(identity: tuple[str, ...]) -> None:
    """Switch auto top-up on (needs a saved card)."""
    _run(identity, lambda step, _provider, account_id: _switch(step, True, account_id))


@auto_topup.command("off")
@identity_argument
def switch_off(identity: tuple[str, ...]) -> None:
    """Switch auto top-up off (the card stays saved)."""
    _run(identity, lambda step, _provider, account_id: _switch(step, False, account_id))


@auto_topup.command("remove-card")
@identity_argument
def remove_card(identity: tuple[str, ...]) -> None:
    """Remove the saved card (the provider forgets it too); switches auto top-up off."""
    _run(identity, _remove_card)
