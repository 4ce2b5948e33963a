"""`ciris-billing export`: an account's data as JSON (`export PROVIDER EXTERNAL_ID`, as
before), and the ledger's or the lots' movements as CSV on stdout (`export ledger|lots --from
--to [--account-id]`), streamed in constant memory (reports/exports.py)."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime, timedelta

import click

from ciris_billing.cli_accounts import export as account_export
from ciris_billing.config import get_settings
from ciris_billing.db import create_engine
from ciris_billing.reports import exports
from ciris_billing.reports.revenue import day_start


class ExportGroup(click.Group):
    """`export PROVIDER EXTERNAL_ID` keeps working: a first word that names no export is the
    account export's."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["account", *args]
        return super().parse_args(ctx, args)


@click.group(cls=ExportGroup)
def export() -> None:
    """Export an account's data (JSON), or the ledger's or lots' movements (CSV)."""


export.add_command(account_export, "account")


async def _stream(
    kind: exports.Export, first: datetime, last: datetime, account: str | None
) -> None:
    engine = create_engine(get_settings())
    try:
        start, end = day_start(first.date()), day_start(last.date()) + timedelta(1)
        async for chunk in exports.stream_csv(engine, kind, start, end, account):
            sys.stdout.write(chunk)
        sys.stdout.flush()
    finally:
        await engine.dispose()


def _movements_command(kind: exports.Export, what: str) -> click.Command:
    @click.command(kind, help=f"{what} from --from to --to (UTC days, included) as CSV.")
    @click.option("--from", "first", type=click.DateTime(["%Y-%m-%d"]), required=True)
    @click.option("--to", "last", type=click.DateTime(["%Y-%m-%d"]), required=True)
    @click.option("--account-id", default=None, help="One account (default: all)")
    def command(first: datetime, last: datetime, account_id: str | None) -> None:
        if last < first:
            raise click.BadParameter("--to is before --from")
        asyncio.run(_stream(kind, first, last, account_id))

    return command


export.add_command(_movements_command("ledger", "The ledger's rows (charges and credits)"))
export.add_command(_movements_command("lots", "The lots' movements (grants, uses per lot)"))
