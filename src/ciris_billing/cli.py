"""`ciris-billing`: serve, migrate, keys, audit."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing import audit_trail, auth, installation
from ciris_billing import cli_lots as lot_commands
from ciris_billing.accounts import admin, operator_actions
from ciris_billing.accounts import reservations as held
from ciris_billing.audit import AuditReport, PurchaseFinding, audit_payments
from ciris_billing.audit import audit as run_audit
from ciris_billing.audit_trail import Entry, cli_operator
from ciris_billing.autotopup.cli import auto_topup as auto_topup_commands
from ciris_billing.cli_lookup import COMMANDS, parse_identity
from ciris_billing.cli_webhooks import low_balance_threshold, webhook_endpoints
from ciris_billing.config import get_settings
from ciris_billing.database_errors import explained
from ciris_billing.db import create_engine, iso
from ciris_billing.embedded import embedded_postgres, stop_running
from ciris_billing.errors import BillingError
from ciris_billing.observability import configure_logging, log
from ciris_billing.payments import refunds
from ciris_billing.payments import service as payments
from ciris_billing.payments.providers import PaymentConfigurationError, get_payment_provider
from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.portal.cli import portal_links as portal_links_commands
from ciris_billing.serving import TimedHttpToolsProtocol
from ciris_billing.testclock import store as test_clock
from ciris_billing.testclock.cli import test_clock_commands
from ciris_billing.unit_of_work import unit_of_work
from ciris_billing.webhooks import inbox
from ciris_billing.workers import Supervisor, listening_sockets

T = TypeVar("T")


def _with_connection(work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run `work` in one committed transaction on the configured database."""
    return asyncio.run(_with_connection_async(work))


async def _with_connection_async(work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    engine = create_engine(get_settings())
    try:
        async with engine.begin() as conn:
            return await work(conn)
    finally:
        await engine.dispose()


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


@main.group()
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


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


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


def _run_operator(work: Awaitable[T]) -> T:
    async def run() -> T:
        return await work

    try:
        return asyncio.run(run())
    except BillingError as exc:
        raise click.ClickException(f"{exc.code}: {exc.detail}") from None


@main.group()
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


@main.command()
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


@main.command()
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


@main.command()
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


@main.command()
@click.argument("oauth_provider")
@click.argument("external_id")
def export(oauth_provider: str, external_id: str) -> None:
    """Everything held about an account, as JSON."""
    identity = parse_identity((oauth_provider, external_id))
    _print_json(_run_operator(_with_connection_async(lambda conn: admin.export(conn, identity))))


@main.command("audit")
@click.option(
    "--ledger-only",
    is_flag=True,
    help="Only the database's own invariants; do not ask the provider about purchases",
)
def audit_command(ledger_only: bool) -> None:
    """Check every account's counters against its ledger, and every purchase's credit against
    its payment at the provider (paid but uncredited, credited but not paid); exit 1 on any
    finding."""
    click.echo("Auditing every account against its ledger...", err=True)
    report = _with_connection(run_audit)
    paid: list[PurchaseFinding] = []
    if not ledger_only:
        click.echo("Checking every purchase with the payment provider...", err=True)

        async def ask(engine: AsyncEngine, provider: PaymentProvider) -> list[PurchaseFinding]:
            return await audit_payments(engine, provider)

        paid = asyncio.run(_with_provider(ask))
    _print_audit(report, paid)
    if not report.clean or paid:
        sys.exit(1)


def _print_audit(report: AuditReport, paid: list[PurchaseFinding]) -> None:
    for d in report.discrepancies:
        click.echo(
            f"MISMATCH {d.account_id} ({d.oauth_provider} {d.external_id}): "
            f"counters free={d.counters[0]} paid={d.counters[1]} total={d.counters[2]} "
            f"held={d.counters[3]}; ledger free={d.ledger[0]} paid={d.ledger[1]} "
            f"total={d.ledger[2]} held={d.ledger[3]}"
        )
    for finding in [*report.purchase_findings, *paid]:
        click.echo(
            f"PURCHASE {finding.problem}: {finding.purchase_id or '-'} "
            f"(payment {finding.payment_id})"
        )
    for found in report.reservation_findings:
        click.echo(
            f"RESERVATION {found.problem}: {found.reservation_id or '-'} "
            f"(account {found.account_id})"
        )
    for lot in report.lot_findings:
        click.echo(f"LOT {lot.problem}: {lot.lot_id or '-'} (account {lot.account_id})")
    problems = (
        len(report.discrepancies)
        + len(report.purchase_findings)
        + len(report.reservation_findings)
        + len(report.lot_findings)
        + len(paid)
    )
    verdict = "clean" if not problems else f"{problems} findings"
    click.echo(f"Audited {report.accounts_checked} accounts: {verdict}.")


@main.command("audit-log")
@click.option("--account", "account_id", default=None, help="Only this account's (acct_...)")
@click.option("--action", default=None, help="Only this action (grant, refund, suspend, ...)")
@click.option(
    "--door", type=click.Choice(["api", "cli", "console"]), default=None, help="Only this door"
)
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of text")
def audit_log(
    account_id: str | None, action: str | None, door: str | None, limit: int, as_json: bool
) -> None:
    """The operators' audit trail (every operator action: API, CLI and console), newest first:
    who, by which door, when, what, before -> after."""
    rows = _with_connection(
        lambda conn: audit_trail.entries(
            conn, account_id=account_id, action=action, door=door, limit=limit
        )
    )
    for row in rows:
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "id": row.id,
                        "created_at": iso(row.created_at),
                        "actor": row.actor,
                        "api_key_id": row.api_key_id,
                        "door": row.door,
                        "action": row.action,
                        "account_id": row.account_id,
                        "subject": row.subject,
                        "detail": row.detail,
                        "before": row.before,
                        "after": row.after,
                    }
                )
            )
            continue
        changed = "; ".join(
            f"{name}: {old} -> {new}"
            for name, old, new in audit_trail.changes(row.before, row.after)
        )
        click.echo(
            f"{iso(row.created_at)}  {row.actor}  {row.action}  {row.account_id or '-'}  "
            f"{row.subject or '-'}  {changed or 'no change'}  (by {row.door})"
        )
    click.echo(f"{len(rows)} entries.", err=True)


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


if __name__ == "__main__":
    main()
