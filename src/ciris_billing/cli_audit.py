"""`ciris-billing audit` (counters against the ledger, purchases against the provider) and
`audit-log` (the audit trail)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing import audit_trail
from ciris_billing.audit import AuditReport, PurchaseFinding, audit_payments
from ciris_billing.audit import audit as run_audit
from ciris_billing.cli_common import (
    _with_connection,
    _with_provider,
)
from ciris_billing.db import iso
from ciris_billing.payments.providers.base import PaymentProvider

T = TypeVar("T")


@click.command("audit")
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


@click.command("audit-log")
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
