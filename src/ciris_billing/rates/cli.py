"""`ciris-billing rates list|set`: the operator's twin of GET/POST /v1/billing/rates."""

from __future__ import annotations

import click
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.audit_trail import cli_operator
from ciris_billing.cli_common import _with_connection, in_transaction
from ciris_billing.rates import service
from ciris_billing.rates.schemas import MAX_UNITS_PER_USE, RateSet


@click.group("rates")
def rates_group() -> None:
    """List and set rates (a feature's quantity turned into uses)."""


@rates_group.command("list")
def rates_list() -> None:
    """Every feature's rate: feature, units per use, rounding."""
    for row in _with_connection(service.all_rates):
        click.echo(f"{row.feature}  {row.units_per_use} units/use  {row.rounding}")


@rates_group.command("set")
@click.argument("feature")
@click.option(
    "--units-per-use",
    type=click.IntRange(1, MAX_UNITS_PER_USE),
    required=True,
    help="This many units of the feature make one use",
)
@click.option(
    "--rounding",
    type=click.Choice(["up", "carry"]),
    required=True,
    help="up: each request rounds up; carry: the account keeps the remainder",
)
def rates_set(feature: str, units_per_use: int, rounding: str) -> None:
    """Create or replace FEATURE's rate (an audit row; running servers use it within
    RATES_REFRESH_SECONDS)."""
    try:
        valid = RateSet.model_validate(
            {"feature": feature, "units_per_use": units_per_use, "rounding": rounding}
        )
    except ValueError:
        raise click.BadParameter(
            "lower-case letters, digits and _ . : - (at most 64)", param_hint="FEATURE"
        ) from None
    rate = service.Rate(valid.feature, valid.units_per_use, valid.rounding)

    async def work(conn: AsyncConnection) -> None:
        await service.set_rate(conn, cli_operator(), rate)

    in_transaction(work)
    click.echo(f"{rate.feature}: {rate.units_per_use} units/use, {rate.rounding}")
