"""Plans: an account's free uses (how many, reset never or monthly), the packs it may buy and
its low-balance threshold, selected by the account's `plan_name` (the guide's field).

The default plans are the environment's (FREE_USES_PER_ACCOUNT, FREE_USES_RESET, every pack):
`free`, and `paid`, the name a first purchase gives a `free` account (accounts/service.py);
neither is a row. A `plan_name` that names no plan row has the default plan's terms, so
accounts created before plans existed (or named by an app) behave as before.

A change of an account's plan takes effect on free uses from the next period: the free lot
already granted stays as it is; the monthly renewal (ledger/free_periods.py) grants the new
plan's free uses at the next month's start. A plan that resets `never` grants nothing more.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.accounts.service import FREE_PLAN, PAID_PLAN, Identity, get_account
from ciris_billing.audit_trail import Entry, Operator
from ciris_billing.catalog.audit import audit
from ciris_billing.db import accounts, insert_or_ignore, plans, utcnow
from ciris_billing.errors import CatalogConflict, PlanNotFound
from ciris_billing.ledger import free_periods
from ciris_billing.pricing import Pricing

DEFAULT_PLANS = (FREE_PLAN, PAID_PLAN)


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    free_uses: int
    free_uses_reset: str = "never"
    pack_ids: list[str] | None = None  # None: every active pack
    low_balance_threshold_uses: int | None = None

    @property
    def monthly(self) -> bool:
        return self.free_uses_reset == "monthly"

    def body(self) -> dict[str, Any]:
        return asdict(self)


def default_plan(pricing: Pricing, name: str = FREE_PLAN) -> Plan:
    return Plan(name, pricing.free_uses_per_account, pricing.free_uses_reset)


def _plan(row: Row[Any]) -> Plan:
    return Plan(
        row.name,
        int(row.free_uses),
        row.free_uses_reset,
        None if row.pack_ids is None else list(row.pack_ids),
        row.low_balance_threshold_uses,
    )


async def find_plan(conn: AsyncConnection, name: str) -> Plan | None:
    """The plan row named `name` (None for a default plan or a name with no row)."""
    if name in DEFAULT_PLANS:
        return None
    row = (await conn.execute(select(plans).where(plans.c.name == name))).first()
    return None if row is None else _plan(row)


async def plan_for(conn: AsyncConnection, pricing: Pricing, name: str) -> Plan:
    """The terms an account with `plan_name` has: its plan's, else the default plan's."""
    return await find_plan(conn, name) or default_plan(pricing, name)


async def list_plans(conn: AsyncConnection, pricing: Pricing) -> list[Plan]:
    rows = await conn.execute(select(plans).order_by(plans.c.created_at, plans.c.name))
    return [default_plan(pricing), *(_plan(row) for row in rows)]


async def get_plan(conn: AsyncConnection, pricing: Pricing, name: str) -> Plan:
    if name in DEFAULT_PLANS:
        return default_plan(pricing, name)
    found = await find_plan(conn, name)
    if found is None:
        raise PlanNotFound(f"No plan {name!r}")
    return found


async def create_plan(
    conn: AsyncConnection, operator: Operator, plan: Plan, *, request_id: str | None = None
) -> Plan:
    if plan.name in DEFAULT_PLANS:
        raise CatalogConflict(f"The plan {plan.name!r} is defined by the environment")
    now = utcnow()
    # Safe under a double create: the primary key lets one insert win; the other is a 409.
    inserted = await conn.execute(
        insert_or_ignore(plans)
        .values(**asdict(plan), created_at=now, updated_at=now)
        .returning(plans.c.name)
    )
    if inserted.first() is None:
        raise CatalogConflict(f"A plan {plan.name!r} exists already")
    await audit(
        conn,
        operator,
        request_id,
        Entry("plan_create", None, plan.name, plan.body(), {}, plan.body()),
    )
    return plan


async def update_plan(
    conn: AsyncConnection,
    operator: Operator,
    name: str,
    changes: dict[str, Any],
    *,
    request_id: str | None = None,
) -> Plan:
    """Change a plan's terms; its accounts get the new free uses from their next period."""
    if name in DEFAULT_PLANS:
        raise CatalogConflict(f"The plan {name!r} is defined by the environment")
    row = (await conn.execute(select(plans).where(plans.c.name == name).with_for_update())).first()
    if row is None:
        raise PlanNotFound(f"No plan {name!r}")
    before = _plan(row)
    after = replace(before, **changes)
    await conn.execute(
        plans.update().where(plans.c.name == name).values(**changes, updated_at=utcnow())
    )
    await audit(
        conn,
        operator,
        request_id,
        Entry("plan_update", None, name, changes, before.body(), after.body()),
    )
    return after


async def set_account_plan(
    conn: AsyncConnection,
    operator: Operator,
    pricing: Pricing,
    identity: Identity,
    name: str,
    *,
    request_id: str | None = None,
) -> tuple[Row[Any], Plan]:
    """Move the account to plan `name` (a plan row or a default plan). Its free uses change
    from the next period; a plan's low-balance threshold becomes the account's."""
    plan = await get_plan(conn, pricing, name)
    before = await get_account(conn, identity)
    values: dict[str, Any] = {"plan_name": plan.name, "updated_at": utcnow()}
    if plan.monthly:
        # The monthly renewal counts from here: the next period's free lot is the new plan's.
        await free_periods.start_periods(conn, before.id, utcnow())
    if plan.low_balance_threshold_uses is not None:
        values["low_balance_threshold_uses"] = plan.low_balance_threshold_uses
    # One row, one statement: the account's row lock orders it against its charges.
    after = (
        await conn.execute(
            accounts.update()
            .where(accounts.c.id == before.id)
            .values(**values)
            .returning(*accounts.c)
        )
    ).one()
    await audit(
        conn,
        operator,
        request_id,
        Entry(
            "account_plan",
            before.id,
            None,
            {"plan_name": plan.name},
            {"plan_name": before.plan_name},
            {"plan_name": plan.name},
        ),
    )
    return after, plan
