"""`ciris-billing keys ...`: create, list and revoke API keys."""

from __future__ import annotations

import click
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import audit_trail, auth
from ciris_billing.audit_trail import Entry, cli_operator
from ciris_billing.cli_common import (
    _with_connection,
)
from ciris_billing.db import iso
from ciris_billing.errors import BillingError


@click.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.option("--name", required=True, help="Who or what uses the key")
@click.option("--scopes", default="read,write", show_default=True, help="read, write, admin")
def keys_create(name: str, scopes: str) -> None:
    """Create a key; the key itself is printed alone on the last line, once."""
    try:
        scope_set = auth.parse_scopes(scopes)
    except BillingError as exc:
        raise click.BadParameter(exc.detail, param_hint="--scopes") from None

    async def create(conn: AsyncConnection) -> tuple[str, str]:
        key_id, key = await auth.create_key(conn, name, scope_set)
        entry = Entry(
            "create_key", None, key_id, {"name": name, "scopes": sorted(scope_set)}, {}, {}
        )
        await audit_trail.record_action(conn, cli_operator(), entry)
        return key_id, key

    key_id, key = _with_connection(create)
    click.echo(
        f"Created key {key_id} ({name}; scopes: {','.join(sorted(scope_set))}). Store it now:"
    )
    click.echo(key)


@keys.command("list")
def keys_list() -> None:
    """List keys (never the keys themselves: only their first characters)."""
    rows = _with_connection(auth.list_keys)
    for row in rows:
        state = f"revoked {iso(row.revoked_at)}" if row.revoked_at else "active"
        click.echo(
            f"{row.id}  {row.key_prefix}...  {row.scopes:<16} {state:<10} "
            f"{iso(row.created_at)}  {row.name}"
        )


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke a key by its id (see `keys list`); running servers stop accepting it in seconds."""

    async def revoke(conn: AsyncConnection) -> bool:
        if not await auth.revoke_key(conn, key_id):
            return False
        entry = Entry("revoke_key", None, key_id, {}, {"active": True}, {"active": False})
        await audit_trail.record_action(conn, cli_operator(), entry)
        return True

    if not _with_connection(revoke):
        raise click.ClickException(f"No active key with id {key_id}")
    click.echo(f"Revoked {key_id}.")
