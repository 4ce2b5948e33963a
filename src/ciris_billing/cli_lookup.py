"""Operator look-ups for `ciris-billing`: accounts (show, list, search), transactions, purchases.

Readable tables (rich) by default, `--json` for scripts. IDENTITY is `PROVIDER/EXTERNAL_ID`
(e.g. `oauth:google/user@example.com`) or the two as separate arguments.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.accounts import service
from ciris_billing.accounts.schemas import IdentityFields
from ciris_billing.config import get_settings
from ciris_billing.console import queries
from ciris_billing.db import accounts, create_engine, iso, purchases
from ciris_billing.errors import BillingError
from ciris_billing.payments.purchases import api_status, stored_status

T = TypeVar("T")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table")
limit_option = click.option(
    "--limit", default=50, show_default=True, type=click.IntRange(1, 10_000)
)


def parse_identity(parts: Sequence[str]) -> service.Identity:
    if len(parts) == 1 and "/" in parts[0]:
        parts = parts[0].split("/", 1)
    if len(parts) != 2:
        raise click.BadParameter("give IDENTITY as PROVIDER/EXTERNAL_ID (or the two words)")
    try:
        fields = IdentityFields(oauth_provider=parts[0], external_id=parts[1])
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return service.Identity(fields.oauth_provider, fields.external_id)


def read(work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    async def run() -> T:
        engine = create_engine(get_settings())
        try:
            async with engine.connect() as conn:
                return await work(conn)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except BillingError as exc:
        raise click.ClickException(f"{exc.code}: {exc.detail}") from None


def show(rows: list[dict[str, Any]], columns: Sequence[str], title: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    Console().print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    # Timestamps to the second are plenty in a table (--json has them whole).
    if len(text) >= 19 and text[4] == "-" and text[10] == "T":
        return text[:19].replace("T", " ")
    return text


def _plain(row: Any) -> dict[str, Any]:
    return {k: iso(v) if hasattr(v, "isoformat") else v for k, v in dict(row._mapping).items()}


ACCOUNT_COLUMNS = (
    "id", "oauth_provider", "external_id", "status",
    "free_uses_remaining", "paid_uses_remaining", "held_uses", "total_uses", "created_at",
)  # fmt: skip


@click.group("accounts")
def accounts_group() -> None:
    """Look accounts up."""


@accounts_group.command("show")
@click.argument("identity", nargs=-1, required=True)
@json_option
def accounts_show(identity: tuple[str, ...], as_json: bool) -> None:
    """One account: balances, status and details."""
    who = parse_identity(identity)
    row = read(lambda conn: service.get_account(conn, who))
    data = _plain(row)
    data.pop("last_charge_free_uses", None)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    table = Table(title=f"{who.oauth_provider}/{who.external_id}", show_header=False)
    for key, value in data.items():
        table.add_row(key, "" if value is None else str(value))
    Console().print(table)


@accounts_group.command("list")
@click.option("--status", type=click.Choice(["active", "suspended"]), default=None)
@limit_option
@json_option
def accounts_list(status: str | None, limit: int, as_json: bool) -> None:
    """The newest accounts."""

    async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
        query = select(accounts).order_by(accounts.c.created_at.desc()).limit(limit)
        if status:
            query = query.where(accounts.c.status == status)
        return [_plain(row) for row in await conn.execute(query)]

    show(read(work), ACCOUNT_COLUMNS, "Accounts", as_json)


@accounts_group.command("search")
@click.argument("text")
@limit_option
@json_option
def accounts_search(text: str, limit: int, as_json: bool) -> None:
    """Accounts whose id (acct_...), external id, email or display name contains TEXT, or with
    a payment (pi_...) containing it; any case, any part (as the console's search)."""

    async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
        return [_plain(row) for row in await queries.search(conn, text, limit)]

    found = read(work)
    show(
        found,
        (*ACCOUNT_COLUMNS[:3], "customer_email", "display_name", *ACCOUNT_COLUMNS[3:]),
        f"Accounts matching {text!r}",
        as_json,
    )
    if not as_json:
        click.echo(f"{len(found)} account(s).", err=True)


@click.command("transactions")
@click.argument("identity", nargs=-1, required=True)
@limit_option
@json_option
def transactions_command(identity: tuple[str, ...], limit: int, as_json: bool) -> None:
    """An account's ledger, newest first."""
    who = parse_identity(identity)

    async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
        account = await service.get_account(conn, who)
        rows, _total = await service.list_transactions(conn, account.id, limit=limit, offset=0)
        return [_plain(row) for row in rows]

    columns = (
        "created_at", "type", "kind", "free_uses_delta", "paid_uses_delta",
        "amount_minor", "currency", "external_transaction_id", "description",
    )  # fmt: skip
    show(read(work), columns, f"Ledger of {who.oauth_provider}/{who.external_id}", as_json)


@click.group("purchases")
def purchases_group() -> None:
    """Look purchases up."""


@purchases_group.command("list")
@click.option("--status", default=None, help="e.g. succeeded, failed, requires_payment_method")
@limit_option
@json_option
def purchases_list(status: str | None, limit: int, as_json: bool) -> None:
    """The newest purchases, optionally of one status."""

    async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
        query = select(purchases).order_by(purchases.c.created_at.desc()).limit(limit)
        if status:
            query = query.where(purchases.c.status == stored_status(status))
        rows = [_plain(row) for row in await conn.execute(query)]
        for row in rows:
            row.pop("customer_email", None)
            row["status"] = api_status(row["status"])  # the words the API and the guide use
        return rows

    columns = (
        "created_at", "payment_id", "account_id", "status", "amount_minor",
        "currency", "uses", "refunded_minor", "credited_at",
    )  # fmt: skip
    show(read(work), columns, "Purchases", as_json)


COMMANDS = (accounts_group, transactions_command, purchases_group)
