"""`ciris-billing packs|plans|promotion-codes ...` and `ciris-billing account-plan`: the
catalog routes' twins for operators. Input is checked by the routes' own models; every change
is written to the audit trail (door 'cli'), as through the API. Output: the API's JSON."""

from __future__ import annotations

import json
from typing import Any, TypeVar

import click
from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.audit_trail import cli_operator
from ciris_billing.catalog import codes, packs, plans
from ciris_billing.catalog.routes import changes_of
from ciris_billing.catalog.schemas import (
    AccountPlanChange,
    PackCreate,
    PackUpdate,
    PlanCreate,
    PlanUpdate,
    PromotionCodeCreate,
    PromotionCodeUpdate,
)
from ciris_billing.cli_common import in_transaction
from ciris_billing.cli_lookup import parse_identity
from ciris_billing.config import get_settings
from ciris_billing.errors import BillingError
from ciris_billing.pricing import Pricing

M = TypeVar("M", bound=BaseModel)


def _pricing() -> Pricing:
    return Pricing.from_settings(get_settings())


def _model(model: type[M], fields: dict[str, Any]) -> M:
    """The route's own model for the options given (unset ones left out, as in a PATCH)."""
    try:
        return model.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise click.UsageError(problems) from None


def _changes(body: BaseModel, not_null: tuple[str, ...]) -> dict[str, Any]:
    try:
        return changes_of(body, not_null)
    except BillingError as exc:
        raise click.UsageError(exc.detail) from None


def _echo(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _pack_ids(value: str | None) -> list[str] | None:
    return None if value is None else [part.strip() for part in value.split(",") if part.strip()]


@click.group("packs")
def packs_group() -> None:
    """Packs: what a purchase buys (the default pack is the environment's)."""


@packs_group.command("list")
def packs_list() -> None:
    pricing = _pricing()
    found = in_transaction(lambda conn: packs.list_packs(conn, pricing))
    _echo({"packs": [pack.body() for pack in found]})


@packs_group.command("create")
@click.argument("pack_id")
@click.option("--name", required=True)
@click.option("--uses", required=True, type=int)
@click.option("--price-minor", required=True, type=int)
@click.option("--currency", required=True)
@click.option("--expires-in-days", type=int, default=None, help="Its lots expire then")
def packs_create(
    pack_id: str,
    name: str,
    uses: int,
    price_minor: int,
    currency: str,
    expires_in_days: int | None,
) -> None:
    """Add a pack."""
    body = _model(
        PackCreate,
        {
            "pack_id": pack_id,
            "name": name,
            "uses": uses,
            "price_minor": price_minor,
            "currency": currency,
            "expires_in_days": expires_in_days,
        },
    )
    pack = packs.Pack(**body.model_dump())
    made = in_transaction(lambda conn: packs.create_pack(conn, cli_operator(), pack))
    _echo(made.body())


@packs_group.command("update")
@click.argument("pack_id")
@click.option("--name", default=None)
@click.option("--uses", type=int, default=None)
@click.option("--price-minor", type=int, default=None)
@click.option("--expires-in-days", type=int, default=None)
@click.option("--archive", "active", flag_value=False, default=None, help="No new purchases")
@click.option("--unarchive", "active", flag_value=True, help="Offered again")
def packs_update(
    pack_id: str,
    name: str | None,
    uses: int | None,
    price_minor: int | None,
    expires_in_days: int | None,
    active: bool | None,
) -> None:
    """Change a pack, or archive it (a purchase in flight is credited as it began)."""
    body = _model(
        PackUpdate,
        {
            "name": name,
            "uses": uses,
            "price_minor": price_minor,
            "expires_in_days": expires_in_days,
            "active": active,
        },
    )
    changes = _changes(body, ())
    after = in_transaction(lambda conn: packs.update_pack(conn, cli_operator(), pack_id, changes))
    _echo(after.body())


@click.group("plans")
def plans_group() -> None:
    """Plans: free uses (never or monthly), packs, balance.low threshold (`free`: the
    environment's)."""


@plans_group.command("list")
def plans_list() -> None:
    pricing = _pricing()
    found = in_transaction(lambda conn: plans.list_plans(conn, pricing))
    _echo({"plans": [plan.body() for plan in found]})


@plans_group.command("create")
@click.argument("name")
@click.option("--free-uses", required=True, type=int)
@click.option("--free-uses-reset", type=click.Choice(["never", "monthly"]), default="never")
@click.option("--pack-ids", default=None, help="Comma-separated (default: every pack)")
@click.option("--low-balance-threshold-uses", type=int, default=None)
def plans_create(
    name: str,
    free_uses: int,
    free_uses_reset: str,
    pack_ids: str | None,
    low_balance_threshold_uses: int | None,
) -> None:
    """Add a plan."""
    body = _model(
        PlanCreate,
        {
            "name": name,
            "free_uses": free_uses,
            "free_uses_reset": free_uses_reset,
            "pack_ids": _pack_ids(pack_ids),
            "low_balance_threshold_uses": low_balance_threshold_uses,
        },
    )
    plan = plans.Plan(**body.model_dump())
    made = in_transaction(lambda conn: plans.create_plan(conn, cli_operator(), plan))
    _echo(made.body())


@plans_group.command("update")
@click.argument("name")
@click.option("--free-uses", type=int, default=None)
@click.option("--free-uses-reset", type=click.Choice(["never", "monthly"]), default=None)
@click.option("--pack-ids", default=None, help="Comma-separated")
@click.option("--low-balance-threshold-uses", type=int, default=None)
def plans_update(
    name: str,
    free_uses: int | None,
    free_uses_reset: str | None,
    pack_ids: str | None,
    low_balance_threshold_uses: int | None,
) -> None:
    """Change a plan: its accounts' free uses change from their next period."""
    body = _model(
        PlanUpdate,
        {
            "free_uses": free_uses,
            "free_uses_reset": free_uses_reset,
            "pack_ids": _pack_ids(pack_ids),
            "low_balance_threshold_uses": low_balance_threshold_uses,
        },
    )
    changes = _changes(body, ())
    after = in_transaction(lambda conn: plans.update_plan(conn, cli_operator(), name, changes))
    _echo(after.body())


@click.command("account-plan")
@click.argument("identity", nargs=-1, required=True)
@click.option("--plan", "plan_name", required=True, help="The plan's name")
def account_plan(identity: tuple[str, ...], plan_name: str) -> None:
    """Move an account (PROVIDER/EXTERNAL_ID) to another plan: free uses from the next period."""
    who = parse_identity(identity)
    body = _model(AccountPlanChange, {"plan_name": plan_name})
    pricing = _pricing()

    async def work(conn: AsyncConnection) -> dict[str, Any]:
        row, plan = await plans.set_account_plan(conn, cli_operator(), pricing, who, body.plan_name)
        return {"account_id": row.id, "plan_name": plan.name}

    _echo(in_transaction(work))


@click.group("promotion-codes")
def codes_group() -> None:
    """Promotion codes: a discount on packs, with limits."""


@codes_group.command("list")
def codes_list() -> None:
    found = in_transaction(codes.list_codes)
    _echo({"promotion_codes": [code.body() for code in found]})


@codes_group.command("create")
@click.argument("code")
@click.option("--percent-off", type=int, default=None)
@click.option("--amount-off-minor", type=int, default=None)
@click.option("--pack-ids", default=None, help="Comma-separated (default: every pack)")
@click.option("--max-redemptions", type=int, default=None)
@click.option("--once-per-account", is_flag=True, default=False)
@click.option("--expires-at", default=None, help="RFC 3339")
def codes_create(
    code: str,
    percent_off: int | None,
    amount_off_minor: int | None,
    pack_ids: str | None,
    max_redemptions: int | None,
    once_per_account: bool,
    expires_at: str | None,
) -> None:
    """Add a promotion code (exactly one of --percent-off and --amount-off-minor)."""
    if (percent_off is None) == (amount_off_minor is None):
        raise click.UsageError("give exactly one of --percent-off and --amount-off-minor")
    body = _model(
        PromotionCodeCreate,
        {
            "code": code,
            "percent_off": percent_off,
            "amount_off_minor": amount_off_minor,
            "pack_ids": _pack_ids(pack_ids),
            "max_redemptions": max_redemptions,
            "once_per_account": once_per_account,
            "expires_at": expires_at,
        },
    )
    new = codes.PromotionCode(**body.model_dump())
    made = in_transaction(lambda conn: codes.create_code(conn, cli_operator(), new))
    _echo(made.body())


@codes_group.command("update")
@click.argument("code")
@click.option("--deactivate", "active", flag_value=False, default=None)
@click.option("--activate", "active", flag_value=True)
@click.option("--max-redemptions", type=int, default=None)
@click.option("--expires-at", default=None, help="RFC 3339")
def codes_update(
    code: str, active: bool | None, max_redemptions: int | None, expires_at: str | None
) -> None:
    """Switch a code off or on, change its limit or expiry."""
    body = _model(
        PromotionCodeUpdate,
        {"active": active, "max_redemptions": max_redemptions, "expires_at": expires_at},
    )
    changes = _changes(body, ())
    after = in_transaction(lambda conn: codes.update_code(conn, cli_operator(), code, changes))
    _echo(after.body())


COMMANDS = (packs_group, plans_group, codes_group, account_plan)
