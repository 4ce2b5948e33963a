"""`ciris-billing webhook-endpoints ...`: the webhook endpoint API's twins for operators, and
`deliver` (one delivery run now, as the jobs do). JSON on stdout, as the API answers."""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import audit_trail
from ciris_billing.audit_trail import Entry, cli_operator
from ciris_billing.cli_common import in_transaction as _in_transaction
from ciris_billing.config import get_settings
from ciris_billing.db import create_engine
from ciris_billing.errors import BillingError
from ciris_billing.events import actions, endpoints, ssrf
from ciris_billing.events.delivery import Deliveries
from ciris_billing.events.outbox import EVENT_TYPES
from ciris_billing.observability import log

T = TypeVar("T")


async def _audited(
    conn: AsyncConnection, action: str, endpoint_id: str, detail: dict[str, Any] | None = None
) -> None:
    """The command's audit-trail row (door 'cli'), in its transaction."""
    entry = Entry(action, None, endpoint_id, detail or {}, {}, {})
    await audit_trail.record_action(conn, cli_operator(), entry)


def _print(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


@click.group("webhook-endpoints")
def webhook_endpoints() -> None:
    """Outgoing webhooks: endpoints, their secrets and deliveries."""


@webhook_endpoints.command("create")
@click.argument("url")
@click.option(
    "--event",
    "kinds",
    multiple=True,
    type=click.Choice(EVENT_TYPES),
    help="An event type to send (repeat; none: all)",
)
@click.option("--description", default=None)
def create_command(url: str, kinds: tuple[str, ...], description: str | None) -> None:
    """A new endpoint for URL; prints it with its secret (shown only now)."""
    settings = get_settings()
    try:
        asyncio.run(ssrf.safe_target(url, allow_private=settings.allow_private_webhook_urls))
    except BillingError as exc:
        raise click.ClickException(f"{exc.code}: {exc.detail}") from None
    new = endpoints.NewEndpoint(url, list(kinds) or None, description)

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        row, secret = await endpoints.create(conn, new)
        log.info("webhook_endpoint_created", endpoint_id=row.id, events=row.events, by="cli")
        await _audited(conn, "create_endpoint", row.id, {"events": row.events})
        return endpoints.endpoint_body(row, secret)

    _print(_in_transaction(work))


@webhook_endpoints.command("list")
def list_command() -> None:
    """Every endpoint (no secrets)."""

    async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
        return [endpoints.endpoint_body(row) for row in await endpoints.list_endpoints(conn)]

    _print(_in_transaction(work))


@webhook_endpoints.command("show")
@click.argument("endpoint_id")
def show_command(endpoint_id: str) -> None:
    """One endpoint (no secret)."""

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        return endpoints.endpoint_body(await endpoints.get(conn, endpoint_id))

    _print(_in_transaction(work))


@webhook_endpoints.command("delete")
@click.argument("endpoint_id")
def delete_command(endpoint_id: str) -> None:
    """Remove an endpoint and its deliveries."""

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        await endpoints.delete(conn, endpoint_id)
        log.info("webhook_endpoint_deleted", endpoint_id=endpoint_id, by="cli")
        await _audited(conn, "delete_endpoint", endpoint_id)
        return {"id": endpoint_id, "deleted": True}

    _print(_in_transaction(work))


@webhook_endpoints.command("rotate-secret")
@click.argument("endpoint_id")
def rotate_command(endpoint_id: str) -> None:
    """A new secret (shown only now); the old one signs beside it for 24 hours."""

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        row, secret = await endpoints.rotate_secret(conn, endpoint_id)
        log.info("webhook_endpoint_secret_rotated", endpoint_id=row.id, by="cli")
        await _audited(conn, "rotate_secret", row.id)
        return endpoints.endpoint_body(row, secret)

    _print(_in_transaction(work))


def _set_enabled(endpoint_id: str, enabled: bool) -> None:
    async def work(conn: AsyncConnection) -> dict[str, Any]:
        entry, row = await actions.set_enabled(conn, endpoint_id, enabled)
        log.info(
            f"webhook_endpoint_{'enabled' if enabled else 'disabled_by_operator'}",
            endpoint_id=row.id,
            by="cli",
        )
        await audit_trail.record_action(conn, cli_operator(), entry)
        return endpoints.endpoint_body(row)

    _print(_in_transaction(work))


@webhook_endpoints.command("disable")
@click.argument("endpoint_id")
def disable_command(endpoint_id: str) -> None:
    """Stop sending to an endpoint."""
    _set_enabled(endpoint_id, False)


@webhook_endpoints.command("enable")
@click.argument("endpoint_id")
def enable_command(endpoint_id: str) -> None:
    """Send to an endpoint again (its run of failures starts anew)."""
    _set_enabled(endpoint_id, True)


@webhook_endpoints.command("deliveries")
@click.argument("endpoint_id")
@click.option("--status", type=click.Choice(["pending", "delivered", "failed"]), default=None)
@click.option("--limit", type=click.IntRange(1, 500), default=50, show_default=True)
def deliveries_command(endpoint_id: str, status: str | None, limit: int) -> None:
    """An endpoint's deliveries, newest first."""

    async def work(conn: AsyncConnection) -> list[dict[str, Any]]:
        rows = await endpoints.deliveries(conn, endpoint_id, status, limit=limit, offset=0)
        return [endpoints.delivery_body(row) for row in rows]

    _print(_in_transaction(work))


@webhook_endpoints.command("resend")
@click.argument("endpoint_id")
@click.argument("delivery_id")
def resend_command(endpoint_id: str, delivery_id: str) -> None:
    """Send a delivery again with the next delivery run (same webhook-id)."""

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        entry, row = await actions.resend(conn, endpoint_id, delivery_id)
        log.info("webhook_delivery_resend", endpoint_id=endpoint_id, delivery_id=delivery_id)
        await audit_trail.record_action(conn, cli_operator(), entry)
        return endpoints.delivery_body(row)

    _print(_in_transaction(work))


@click.command("low-balance-threshold")
@click.argument("oauth_provider")
@click.argument("external_id")
@click.argument("uses")
def low_balance_threshold(oauth_provider: str, external_id: str, uses: str) -> None:
    """The account's own balance.low threshold: USES, or `default` (LOW_BALANCE_THRESHOLD_USES)."""
    from ciris_billing.accounts import operator_actions
    from ciris_billing.accounts.service import Identity

    if uses == "default":
        wanted: int | None = None
    elif uses.isdigit() and int(uses) <= 1_000_000:
        wanted = int(uses)
    else:
        raise click.BadParameter("USES: a number of uses (0 to 1,000,000) or `default`")

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        row, in_force = await operator_actions.set_low_balance_threshold(
            conn, cli_operator(), Identity(oauth_provider, external_id), wanted
        )
        return {
            "account_id": row.id,
            "low_balance_threshold_uses": wanted,
            "threshold_in_force": in_force,
        }

    _print(_in_transaction(work))


@webhook_endpoints.command("deliver")
def deliver_command() -> None:
    """Deliver what is due now, once (the background jobs do this every JOBS_POLL_SECONDS)."""

    async def run() -> dict[str, int]:
        settings = get_settings()
        engine = create_engine(settings)
        deliveries = Deliveries(engine, settings)
        try:
            report = await deliveries.run_once()
        finally:
            await deliveries.aclose()
            await engine.dispose()
        return {
            "dispatched": report.dispatched,
            "delivered": report.delivered,
            "failed": sum(run.failed for run in report.runs),
        }

    _print(asyncio.run(run()))
