"""`ciris-billing portal-links revoke IDENTITY`: every portal link of the account made until now
stops working (the API's `POST .../portal_links/revoke`). IDENTITY is `PROVIDER/EXTERNAL_ID`
or the two words."""

from __future__ import annotations

import asyncio
import json

import click

from ciris_billing.accounts import service as accounts
from ciris_billing.cli_lookup import parse_identity
from ciris_billing.config import get_settings
from ciris_billing.db import create_engine, iso
from ciris_billing.errors import BillingError
from ciris_billing.portal.links import revoke_links
from ciris_billing.unit_of_work import unit_of_work


@click.group("portal-links")
def portal_links() -> None:
    """An account's customer portal links."""


@portal_links.command("revoke")
@click.argument("identity", nargs=-1, required=True)
def revoke(identity: tuple[str, ...]) -> None:
    """Void every portal link of the account made until now (new checks answer new ones)."""
    who = parse_identity(identity)
    settings = get_settings()

    async def work() -> dict[str, str]:
        engine = create_engine(settings)
        try:
            async with unit_of_work(engine) as step:
                conn = await step.connection()
                account = await accounts.get_account(conn, who)
                revoked_at = await revoke_links(conn, account.id)
                return {"account_id": account.id, "revoked_at": iso(revoked_at)}
        finally:
            await engine.dispose()

    try:
        body = asyncio.run(work())
    except BillingError as exc:
        raise click.ClickException(f"{exc.code}: {exc.detail}") from None
    click.echo(json.dumps(body, indent=2))
