"""`ciris-billing grant` and `ciris-billing lots ...`: the grant and lots routes' twins for
operators (IDENTITY is `PROVIDER/EXTERNAL_ID` or the two words). Operator actions are written
to the audit trail (door 'cli'), as through the API."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.accounts import lots, operator_actions
from ciris_billing.accounts.schemas import GrantCreate
from ciris_billing.audit_trail import cli_operator
from ciris_billing.cli_common import in_transaction as _in_transaction
from ciris_billing.cli_lookup import parse_identity, show
from ciris_billing.config import get_settings
from ciris_billing.db import utcnow
from ciris_billing.errors import BillingError
from ciris_billing.pricing import Pricing

T = TypeVar("T")


@click.command()
@click.argument("oauth_provider")
@click.argument("external_id")
@click.option("--uses", required=True, type=int, help="Positive grants; negative takes back")
@click.option("--reason", required=True)
@click.option("--expires-in-days", type=int, default=None, help="The granted uses expire then")
@click.option("--expires-at", default=None, help="...or at this instant (RFC 3339)")
@click.option("--priority", type=int, default=None, help="Lower is used first (default 100)")
@click.option("--kind", type=click.Choice(["promotional", "paid"]), default=None)
@click.option("--cost-basis-minor", type=int, default=None, help="Per use (with --kind paid)")
def grant(
    oauth_provider: str,
    external_id: str,
    uses: int,
    reason: str,
    expires_in_days: int | None,
    expires_at: str | None,
    priority: int | None,
    kind: str | None,
    cost_basis_minor: int | None,
) -> None:
    """Grant (or with negative --uses, take back) paid uses, with a reason. A grant is a lot:
    promotional (or paid, with its cost basis), by priority, expiring or not."""
    if uses == 0:
        raise click.BadParameter("must not be 0", param_hint="--uses")
    identity = parse_identity((oauth_provider, external_id))
    try:
        body = GrantCreate.model_validate(
            {
                "oauth_provider": identity.oauth_provider,
                "external_id": identity.external_id,
                "uses": uses,
                "reason": reason,
                "expires_in_days": expires_in_days,
                "expires_at": expires_at,
                "priority": priority,
                "kind": kind,
                "cost_basis_minor": cost_basis_minor,
            }
        )
        terms = lots.grant_terms(body, utcnow())
    except ValidationError as exc:
        raise click.UsageError("; ".join(str(e["msg"]) for e in exc.errors())) from None
    except BillingError as exc:
        raise click.UsageError(exc.detail) from None
    pricing = Pricing.from_settings(get_settings())
    done = _in_transaction(
        lambda conn: operator_actions.grant(
            conn, cli_operator(), identity, uses, body.reason, pricing, None, terms
        )
    )
    lot = f" (lot {done.lot_id}" if done.lot_id else ""
    if lot:
        lot += f", expires {terms.expires_at.isoformat()})" if terms.expires_at else ")"
    click.echo(
        f"{done.kind}: {uses:+d} uses{lot}; paid uses now {done.account.paid_uses_remaining}."
    )


@click.group("lots")
def lots_group() -> None:
    """An account's lots (grants of uses: free, promotional, paid), and voiding one."""


LOT_COLUMNS = (
    "lot_id", "kind", "status", "uses_remaining", "uses_granted", "priority",
    "expires_at", "source", "created_at",
)  # fmt: skip


@lots_group.command("list")
@click.argument("identity", nargs=-1, required=True)
@click.option("--all", "everything", is_flag=True, help="The closed lots too")
@click.option("--json", "as_json", is_flag=True, help="As the API answers")
def lots_list(identity: tuple[str, ...], everything: bool, as_json: bool) -> None:
    """Open lots in the order uses are taken from them (then, with --all, closed ones)."""
    who = parse_identity(identity)
    found = _in_transaction(
        lambda conn: lots.list_lots(conn, who, "all" if everything else "active")
    )
    if as_json:
        click.echo(json.dumps({"lots": found}, indent=2))
        return
    show(found, LOT_COLUMNS, f"Lots of {who.oauth_provider}/{who.external_id}", False)


@lots_group.command("void")
@click.argument("lot_id")
@click.option("--reason", required=True, help="Why (kept on the ledger row and audit trail)")
def lots_void(lot_id: str, reason: str) -> None:
    """Void what the lot has left (uses held by open holds stay theirs)."""

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        closed, _entry = await lots.void(conn, cli_operator(), lot_id, reason.strip() or None)
        return lots.void_body(closed, reason)

    click.echo(json.dumps(_in_transaction(work), indent=2))
