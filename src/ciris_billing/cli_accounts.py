"""`ciris-billing reservations ...`, `suspend`, `reactivate`, `erase` and `export`: an account's
operator commands (the admin API's twins)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import click

from ciris_billing.accounts import admin, operator_actions
from ciris_billing.accounts import reservations as held
from ciris_billing.audit_trail import cli_operator
from ciris_billing.cli_common import (
    _print_json,
    _run_operator,
    _with_connection,
    _with_connection_async,
)
from ciris_billing.cli_lookup import parse_identity
from ciris_billing.db import iso
from ciris_billing.observability import log

T = TypeVar("T")


@click.group()
def reservations() -> None:
    """List, show and release reservations (holds)."""


def _reservation_line(row: Any) -> str:
    captured = "-" if row.captured_uses is None else str(row.captured_uses)
    return (
        f"{row.id}  {row.status:<8}  uses={row.uses} captured={captured}  "
        f"{row.oauth_provider}/{row.external_id}  expires {iso(row.expires_at)}"
    )


@reservations.command("list")
@click.argument("identity", nargs=-1)
@click.option(
    "--status", type=click.Choice(["held", "captured", "released", "expired"]), default=None
)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
def reservations_list(identity: tuple[str, ...], status: str | None, limit: int) -> None:
    """Reservations, newest first (of IDENTITY, PROVIDER/EXTERNAL_ID, when given)."""
    who = parse_identity(identity) if identity else None
    rows = _with_connection(
        lambda conn: held.list_reservations(conn, who, status, limit=limit, offset=0)
    )
    for row in rows:
        click.echo(_reservation_line(row))
    click.echo(f"{len(rows)} reservation(s).", err=True)


@reservations.command("show")
@click.argument("reservation_id")
def reservations_show(reservation_id: str) -> None:
    """One reservation, as JSON."""
    row = _run_operator(_with_connection_async(lambda conn: held.get(conn, reservation_id)))
    click.echo(json.dumps(_reservation_json(row), indent=2))


@reservations.command("release")
@click.argument("reservation_id")
def reservations_release(reservation_id: str) -> None:
    """Give a hold's uses back now (idempotent; a captured hold cannot be released)."""
    done = _run_operator(
        _with_connection_async(
            lambda conn: operator_actions.release(conn, cli_operator(), reservation_id)
        )
    )
    if done.changed:
        log.info(
            "reservation_released",
            reservation_id=done.reservation.id,
            account_id=done.account.id,
            uses=int(done.reservation.uses),
            by="cli",
        )
    click.echo(f"{done.reservation.id}: {done.reservation.status}")


def _reservation_json(row: Any) -> dict[str, Any]:
    m = row._mapping
    return {
        "reservation_id": m["id"],
        "account_id": m["account_id"],
        "oauth_provider": m["oauth_provider"],
        "external_id": m["external_id"],
        "status": m["status"],
        "uses": int(m["uses"]),
        "free_uses_held": int(m["free_uses_held"]),
        "paid_uses_held": int(m["paid_uses_held"]),
        "captured_uses": m["captured_uses"],
        "charge_id": m["charge_id"],
        "expires_at": iso(m["expires_at"]),
        "created_at": iso(m["created_at"]),
        "closed_at": None if m["closed_at"] is None else iso(m["closed_at"]),
        "metadata": m["metadata"],
    }


@click.command()
@click.argument("oauth_provider")
@click.argument("external_id")
@click.option("--reason", default=None)
def suspend(oauth_provider: str, external_id: str, reason: str | None) -> None:
    """Suspend an account: its charges are refused until reactivated."""
    identity = parse_identity((oauth_provider, external_id))
    _run_operator(
        _with_connection_async(
            lambda conn: operator_actions.set_status(
                conn, cli_operator(), identity, "suspended", reason
            )
        )
    )
    click.echo("Suspended.")


@click.command()
@click.argument("oauth_provider")
@click.argument("external_id")
def reactivate(oauth_provider: str, external_id: str) -> None:
    """Reactivate a suspended account."""
    identity = parse_identity((oauth_provider, external_id))
    _run_operator(
        _with_connection_async(
            lambda conn: operator_actions.set_status(conn, cli_operator(), identity, "active", None)
        )
    )
    click.echo("Reactivated.")


@click.command()
@click.argument("oauth_provider")
@click.argument("external_id")
@click.confirmation_option(prompt="Erase this account's personal data? The ledger stays.")
def erase(oauth_provider: str, external_id: str) -> None:
    """Erase an account's personal data (the ledger and its amounts stay)."""
    identity = parse_identity((oauth_provider, external_id))
    row = _run_operator(
        _with_connection_async(lambda conn: operator_actions.erase(conn, cli_operator(), identity))
    )
    click.echo(f"Erased personal data of {row.id}.")


@click.command()
@click.argument("oauth_provider")
@click.argument("external_id")
def export(oauth_provider: str, external_id: str) -> None:
    """Everything held about an account, as JSON."""
    identity = parse_identity((oauth_provider, external_id))
    _print_json(_run_operator(_with_connection_async(lambda conn: admin.export(conn, identity))))
