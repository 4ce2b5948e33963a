"""`ciris-billing`: serve, migrate, keys, audit."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing import audit_trail, auth
from ciris_billing import cli_lots as lot_commands
from ciris_billing.audit_trail import Entry, cli_operator
from ciris_billing.autotopup.cli import auto_topup as auto_topup_commands
from ciris_billing.cli_accounts import erase, reactivate, reservations, suspend
from ciris_billing.cli_audit import audit_command, audit_log
from ciris_billing.cli_catalog import COMMANDS as CATALOG_COMMANDS
from ciris_billing.cli_common import (
    _print_json,
    _run_operator,
    _with_connection,
    _with_provider,
)
from ciris_billing.cli_exports import export
from ciris_billing.cli_keys import keys
from ciris_billing.cli_lookup import COMMANDS
from ciris_billing.cli_webhooks import low_balance_threshold, webhook_endpoints
from ciris_billing.config import get_settings
from ciris_billing.database_errors import explained
from ciris_billing.db import create_engine
from ciris_billing.embedded import embedded_postgres, stop_running
from ciris_billing.errors import BillingError
from ciris_billing.observability import configure_logging
from ciris_billing.payments import refunds
from ciris_billing.payments import service as payments
from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.portal.cli import portal_links as portal_links_commands
from ciris_billing.rates.cli import rates_group as rates_commands
from ciris_billing.serving import TimedHttpToolsProtocol
from ciris_billing.testclock import store as test_clock
from ciris_billing.testclock.cli import test_clock_commands
from ciris_billing.unit_of_work import unit_of_work
from ciris_billing.webhooks import inbox
from ciris_billing.workers import Supervisor, listening_sockets

T = TypeVar("T")


def migrate_database(database_url: str | None = None) -> None:
    """Bring the schema to the latest migration (alembic upgrade head)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "ciris_billing:migrations")
    config.attributes["database_url"] = database_url or get_settings().database_url
    command.upgrade(config, "head")


class _Main(click.Group):
    """Notes whether the command asks for its --help, which needs no database: the group's
    callback runs before the command's own options are parsed."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        ctx.meta["help_only"] = any(arg in ctx.help_option_names for arg in rest)
        return name, command, rest

    def invoke(self, ctx: click.Context) -> Any:
        """Any command: a database that cannot be reached or refuses connections is one clear
        line and exit 1 (click's error), not a traceback."""
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except Exception as exc:
            reason = explained(exc)
            if reason is None:
                raise
            raise click.ClickException(reason) from None


@click.group(cls=_Main)
@click.pass_context
def main(ctx: click.Context) -> None:
    """CIRIS Billing: free uses, paid uses, purchases and a ledger that cannot go wrong."""
    settings = get_settings()
    # Commands print their results on stdout; their logs go to stderr (the server logs to stdout).
    configure_logging(settings.log_level, sys.stderr)
    # `db` manages the embedded server itself: it must not start one.
    embedded = ctx.invoked_subcommand != "db" and not ctx.meta.get("help_only")
    if settings.database_url is None and embedded:
        _use_embedded_postgres(ctx, settings.embedded_postgres_dir)
    if embedded and ctx.invoked_subcommand not in (None, *FOLLOW_THEIR_OWN_CLOCK):
        # The command's time rules (a hold's release, a link's lifetime) use the sandbox's test
        # clock too: read once here, for every command (clock.py).
        asyncio.run(_load_test_clock())


# Commands that read the test clock themselves (`serve`'s and `worker`'s processes follow it)
# or have no time rule to apply (`migrate`: the table may not exist yet).
FOLLOW_THEIR_OWN_CLOCK = ("migrate", "serve", "worker", "test-clock")


async def _load_test_clock() -> None:
    settings = get_settings()
    if not test_clock.is_sandbox(settings):
        return
    engine = create_engine(settings)
    try:
        await test_clock.load(engine, settings)
    finally:
        await engine.dispose()


@main.group()
def db() -> None:
    """The embedded PostgreSQL (used when DATABASE_URL is unset)."""


@db.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL in EMBEDDED_POSTGRES_DIR, whoever started it (e.g. one left
    running by a `serve` killed with -9)."""
    data_dir = get_settings().embedded_postgres_dir
    port = stop_running(data_dir)
    if port is None:
        click.echo(f"No embedded PostgreSQL running on {data_dir}.")
    else:
        click.echo(f"Stopped the embedded PostgreSQL on {data_dir} (port {port}).")


def _use_embedded_postgres(ctx: click.Context, data_dir: Path) -> None:
    """No DATABASE_URL: start (or join) the embedded PostgreSQL for this command; the command
    that started it stops it when it ends (for `serve`: when the service stops)."""
    server = ctx.with_resource(embedded_postgres(data_dir))
    url = server.url()
    # Through the environment, so `serve`'s worker processes (which inherit it) connect too.
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    how = (
        "left running by a command that is gone: adopted, stopped when this one ends"
        if server.adopted
        else "started"
        if server.started_here
        else "already running, joined"
    )
    click.echo(f"Embedded PostgreSQL ({how}): data in {server.data_dir}", err=True)
    click.echo(f"  DATABASE_URL={url}", err=True)


@main.command()
def migrate() -> None:
    """Apply database migrations."""
    migrate_database()
    click.echo("Database is at the latest migration.")


def _bootstrap_admin_key() -> None:
    """On first start (no key at all), create an admin key and show it once, where no log
    collector keeps it: on the terminal when stdout is one, else in a new file only the
    service's user can read (0600) whose path is printed (stdout is the JSON logs' stream)."""

    async def work(conn: AsyncConnection) -> str | None:
        if await auth.count_keys(conn):
            return None
        _key_id, key = await auth.create_key(conn, "admin (first start)", frozenset({"admin"}))
        return key

    key = _with_connection(work)
    if key is None:
        return
    if sys.stdout.isatty():
        click.echo("Created the first API key (scope: admin). It is shown only once; store it now:")
        click.echo(f"  {key}")
    else:
        path = write_private_file("ciris-billing-first-admin-key-", key + "\n")
        click.echo(
            "Created the first API key (scope: admin). Not printed here (this output is not a "
            f"terminal, and may be collected): it is in {path} (readable only by this user). "
            "Store it, then delete that file."
        )
    click.echo("Make more with: ciris-billing keys create --name NAME --scopes read,write")


def write_private_file(prefix: str, content: str) -> Path:
    """A new file (mode 0600, created so: never readable by others) holding `content`."""
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=".txt")
    with os.fdopen(handle, "w") as file:
        file.write(content)
    return Path(name)


APP = "ciris_billing.app:create_app"


def is_loopback(host: str) -> bool:
    """Is `host` (as given to --host) a loopback address? Names other than localhost are not:
    what they resolve to can change."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def proxy_options(forwarded_allow_ips: str | None) -> dict[str, Any]:
    """uvicorn's proxy settings from FORWARDED_ALLOW_IPS: forwarded headers believed only from
    those addresses; unset, from none (uvicorn's own default believes any local process)."""
    allowed = (forwarded_allow_ips or "").strip()
    return {"proxy_headers": bool(allowed), "forwarded_allow_ips": allowed or ""}


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--migrate/--no-migrate", "run_migrations", default=True, show_default=True)
def serve(host: str, port: int, workers: int, run_migrations: bool) -> None:
    """Migrate, make sure an admin key exists, and serve the API."""
    import uvicorn

    settings = get_settings()
    problems = settings.payment_problems()
    sandbox = settings.active_payment_provider == "sandbox"
    if sandbox and not settings.sandbox_allow_public and not is_loopback(host):
        problems.append(
            f"the sandbox provider would be served on {host}, a non-loopback address: "
            "anyone who reaches it with a checkout link can pay with a test card. Serve on "
            "127.0.0.1, or set SANDBOX_ALLOW_PUBLIC=true to allow it"
        )
    if problems:
        raise click.ClickException("Refusing to start: " + "; ".join(problems))
    if run_migrations:
        migrate_database()
    _bootstrap_admin_key()
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Workers share one metrics view through files in this directory.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="ciris-billing-metrics-")
    provider = settings.active_payment_provider
    click.echo(
        f"Serving CIRIS Billing on http://{host}:{port} "
        f"(database: {settings.async_database_url.split(':', 1)[0]}, workers: {workers}, "
        f"payments: {provider})"
    )
    if provider == "sandbox":
        click.echo(
            "*** PAYMENTS ARE IN SANDBOX MODE: test cards only, no real money moves. "
            "Set STRIPE_API_KEY / PAYMENT_PROVIDER=stripe for real payments. ***"
        )
    options: dict[str, Any] = {
        "factory": True,
        "host": host,
        "port": port,
        "workers": workers,
        # Our own access log instead (observability.py: route template, redacted query).
        "access_log": False,
        "log_config": None,
        "server_header": False,
        # Longer than clients' idle keep-alive (httpx: 5 s), so a client never reuses a
        # connection the server is closing at that very moment.
        "timeout_keep_alive": 15,
        # uvicorn's httptools protocol with header and body read timeouts (serving.py).
        "http": TimedHttpToolsProtocol,
        **proxy_options(settings.forwarded_allow_ips),
    }
    if threading.current_thread() is threading.main_thread():
        # A stop asked for (SIGTERM: systemd, docker, kill) ends in a clean exit, 0, once the
        # server has shut down gracefully (uvicorn raises the SIGTERM again after that, and
        # its default action would exit 143, which systemd counts as a failure); the embedded
        # PostgreSQL's `finally` still stops it.
        signal.signal(signal.SIGTERM, _stopped)
    if workers == 1:
        uvicorn.run(APP, **options)
        return
    # Each worker on its own SO_REUSEPORT socket, so connections spread evenly (workers.py).
    config = uvicorn.Config(APP, **options)
    Supervisor(config, listening_sockets(host, port, workers)).run()


def _stopped(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(0)


@main.command()
def reconcile() -> None:
    """Ask the provider about every purchase not yet final; credit paid ones (exactly once)."""

    async def work(engine: AsyncEngine, provider: PaymentProvider) -> dict[str, int]:
        async with engine.connect() as conn:
            open_purchases = await payments.open_purchases(conn, provider.name)
        outcomes: dict[str, int] = {}
        for index, purchase in enumerate(open_purchases, 1):
            try:
                async with unit_of_work(engine) as step:
                    outcome = await payments.reconcile_purchase(step, provider, purchase.payment_id)
            except BillingError as exc:
                outcome = f"error:{exc.code}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            click.echo(f"[{index}/{len(open_purchases)}] {purchase.payment_id}: {outcome}")
        return outcomes

    outcomes = asyncio.run(_with_provider(work))
    summary = ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())) or "nothing open"
    click.echo(f"Reconciled: {summary}.")
    if any(key.startswith("error:") for key in outcomes):
        sys.exit(1)


@main.group()
def webhooks() -> None:
    """Stored webhook events."""


@webhooks.command("replay")
def webhooks_replay() -> None:
    """Handle again every stored event that was not handled (a failed attempt)."""

    async def work(engine: AsyncEngine, provider: PaymentProvider) -> tuple[int, int]:
        handled = failed = 0
        for event_id in await inbox.unhandled_event_ids(engine, provider.name):
            try:
                async with unit_of_work(engine) as step:
                    result = await inbox.handle(step, provider, event_id)
                click.echo(f"{event_id}: {result.outcome}")
                handled += 1
            except BillingError as exc:
                click.echo(f"{event_id}: failed ({exc.code})")
                failed += 1
        return handled, failed

    handled, failed = asyncio.run(_with_provider(work))
    click.echo(f"Replayed {handled} events, {failed} still failing.")
    if failed:
        sys.exit(1)


@main.command()
@click.argument("payment_id")
@click.option(
    "--amount", "amount_minor", type=click.IntRange(min=1), help="Minor units (default: all)"
)
@click.option("--reason", default=None)
def refund(payment_id: str, amount_minor: int | None, reason: str | None) -> None:
    """Refund a purchase (all, or --amount minor units); takes its share of uses back."""

    async def work(engine: AsyncEngine, provider: PaymentProvider) -> dict[str, object]:
        async with unit_of_work(engine) as step:
            made = await refunds.make_refund(step, provider, payment_id, amount_minor, None)
            conn = await step.connection()
            result = await refunds.record_refund(conn, provider.name, made, reason)
            purchase = await payments.get_purchase(conn, provider.name, payment_id)
            account_id = purchase.account_id
            detail = {"amount_minor": made.amount_minor, "refund_id": made.refund_id}
            entry = Entry(
                "refund",
                account_id,
                payment_id,
                {**detail, "uses_reversed": result["uses_reversed"], "reason": reason},
                {},
                {"refunded_minor": result["refunded_minor"], "status": result["purchase_status"]},
            )
            await audit_trail.record_action(conn, cli_operator(), entry)
            return result

    _print_json(_run_operator(_with_provider(work)))


@main.command()
def worker() -> None:
    """Run the background jobs only (webhook retries, reconcile, hold expiry, outgoing webhook
    deliveries), until stopped. `serve` runs them too unless JOBS_ENABLED=false; any number may
    run: each job still runs once."""
    from ciris_billing.jobs import JobWorker

    async def work(engine: AsyncEngine, provider: PaymentProvider) -> None:
        settings = get_settings()
        click.echo(
            f"Running background jobs every {settings.jobs_poll_seconds} s "
            f"(payments: {provider.name}); Ctrl-C stops.",
            err=True,
        )
        async with test_clock.following(engine, settings):  # the sandbox's clock (clock.py)
            await JobWorker(settings, engine, provider).run()

    with contextlib.suppress(KeyboardInterrupt):
        # The worker redelivers the sandbox's webhooks too, into the inbox (local_delivery.py).
        asyncio.run(_with_provider(work, delivers=True))


for _command in (*COMMANDS, webhook_endpoints, low_balance_threshold):
    main.add_command(_command)
main.add_command(auto_topup_commands)
main.add_command(lot_commands.grant)
main.add_command(lot_commands.lots_group)
main.add_command(portal_links_commands)
main.add_command(test_clock_commands)
for _command in CATALOG_COMMANDS:
    main.add_command(_command)
main.add_command(rates_commands)
for _command in (keys, reservations, suspend, reactivate, erase, export, audit_command, audit_log):
    main.add_command(_command)


if __name__ == "__main__":
    main()
