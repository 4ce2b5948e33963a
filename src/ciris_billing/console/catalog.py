"""The console's catalog page (packs, plans, promotion codes) and its actions: create and
archive packs, create plans, move an account to a plan, create and switch off codes. Each runs
the service function the API and the CLI run (catalog/), with its audit row carrying the
confirmation's one-time id (action_routes.py: confirm first, then run)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from sqlalchemy import select

from ciris_billing import audit_trail
from ciris_billing.accounts.service import Identity
from ciris_billing.catalog import codes, packs, plans
from ciris_billing.catalog.schemas import PackCreate, PlanCreate, PromotionCodeCreate
from ciris_billing.console.action_plan import Plan, Planner, Runner
from ciris_billing.console.actions import Done, _unused
from ciris_billing.console.sessions import Session
from ciris_billing.console.web import page, session_of, to_login
from ciris_billing.db import accounts
from ciris_billing.db import audit_trail as audit_table
from ciris_billing.deps import AppState, StateDep, UnitOfWorkDep
from ciris_billing.errors import AccountNotFound, InvalidRequest
from ciris_billing.unit_of_work import UnitOfWork

router = APIRouter(prefix="/console", include_in_schema=False)
BACK = "/console/catalog"


@router.get("/catalog")
async def catalog_page(
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    notice: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    session = await session_of(request, state, work)
    if session is None:
        return to_login()
    conn = await work.connection()
    return page(
        "console_catalog.html",
        session,
        packs=await packs.list_packs(conn, state.pricing),
        plans=await plans.list_plans(conn, state.pricing),
        codes=await codes.list_codes(conn),
        notice=await audit_trail.entry(conn, notice) if notice else None,
        changes=audit_trail.changes,
        nav="catalog",
    )


def _valid(model: type[BaseModel], form: dict[str, str], names: tuple[str, ...]) -> BaseModel:
    """The form's fields through the API's own model (blank fields left out)."""
    fields: dict[str, Any] = {}
    for name in names:
        value = form.get(name, "").strip()
        if not value:
            continue
        if name == "pack_ids":
            fields[name] = [part.strip() for part in value.split(",") if part.strip()]
        elif name in INT_FIELDS:
            try:
                fields[name] = int(value)
            except ValueError:
                raise InvalidRequest(f"{name} must be a whole number") from None
        elif name == "once_per_account":
            fields[name] = value == "yes"
        else:
            fields[name] = value
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidRequest(
            "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None


INT_FIELDS = frozenset(
    ("uses", "price_minor", "expires_in_days", "free_uses", "percent_off", "amount_off_minor",
     "max_redemptions", "low_balance_threshold_uses")
)  # fmt: skip
PACK_FIELDS = ("pack_id", "name", "uses", "price_minor", "currency", "expires_in_days")
PLAN_FIELDS = ("name", "free_uses", "free_uses_reset", "pack_ids", "low_balance_threshold_uses")
CODE_FIELDS = ("code", "percent_off", "amount_off_minor", "pack_ids", "max_redemptions",
               "once_per_account", "expires_at")  # fmt: skip


def _kept(form: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    return {name: form.get(name, "").strip() for name in names}


async def _plan_create_pack(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    body = _valid(PackCreate, form, PACK_FIELDS)
    assert isinstance(body, PackCreate)
    days = f", its lots expire after {body.expires_in_days} days" if body.expires_in_days else ""
    return Plan(
        "Add this pack?",
        [
            f"{body.pack_id}: {body.uses} uses for {body.price_minor} {body.currency}"
            f" minor units{days}"
        ],
        _kept(form, PACK_FIELDS),
        BACK,
    )


async def _plan_pack_active(
    state: AppState, work: UnitOfWork, form: dict[str, str], active: bool
) -> Plan:
    pack = await packs.get_pack(await work.connection(), state.pricing, form.get("pack_id", ""))
    line = (
        "It is offered again."
        if active
        else "No new purchases of it; a purchase already begun is credited as it began."
    )
    title = "Offer this pack again?" if active else "Archive this pack?"
    return Plan(title, [f"{pack.pack_id} ({pack.name})", line], {"pack_id": pack.pack_id}, BACK)


async def _plan_create_plan(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    body = _valid(PlanCreate, form, PLAN_FIELDS)
    assert isinstance(body, PlanCreate)
    which = "every pack" if body.pack_ids is None else ", ".join(body.pack_ids)
    return Plan(
        "Add this plan?",
        [f"{body.name}: {body.free_uses} free uses ({body.free_uses_reset}); packs: {which}"],
        _kept(form, PLAN_FIELDS),
        BACK,
    )


async def _plan_account_plan(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    account_id = form.get("account_id", "").strip()
    conn = await work.connection()
    row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).first()
    if row is None:
        raise InvalidRequest(f"No account {account_id}")
    plan = await plans.get_plan(conn, state.pricing, form.get("plan_name", "").strip())
    return Plan(
        "Move this account to another plan?",
        [
            f"Account {account_id}: plan {row.plan_name} → {plan.name}",
            "Its free uses change from the next period; the plan's packs apply at once.",
        ],
        {"account_id": account_id, "plan_name": plan.name},
        f"/console/accounts/{account_id}",
    )


async def _plan_create_code(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    body = _valid(PromotionCodeCreate, form, CODE_FIELDS)
    assert isinstance(body, PromotionCodeCreate)
    if (body.percent_off is None) == (body.amount_off_minor is None):
        raise InvalidRequest("Give exactly one of percent off and amount off")
    off = (
        f"{body.percent_off}% off"
        if body.percent_off
        else f"{body.amount_off_minor} minor units off"
    )
    limit = f", at most {body.max_redemptions} times" if body.max_redemptions else ""
    return Plan(
        "Add this promotion code?", [f"{body.code}: {off}{limit}"], _kept(form, CODE_FIELDS), BACK
    )


async def _plan_deactivate_code(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    code = await codes.get_code(await work.connection(), form.get("code", ""))
    return Plan(
        "Switch this code off?",
        [f"{code.code}: redeemed {code.redemptions} times", "Purchases naming it are refused."],
        {"code": code.code},
        BACK,
    )


async def _done(work: UnitOfWork, request_id: str, account_id: str | None = None) -> Done:
    conn = await work.connection()
    entry_id = await conn.scalar(
        select(audit_table.c.id).where(audit_table.c.request_id == request_id)
    )
    return Done(str(entry_id), account_id)


async def _run_create_pack(
    state: AppState, work: UnitOfWork, session: Session, fields: dict[str, str], request_id: str
) -> Done:
    conn = await work.connection()
    await _unused(conn, request_id)
    body = _valid(PackCreate, fields, PACK_FIELDS)
    pack = packs.Pack(**body.model_dump())
    await packs.create_pack(conn, session.operator, pack, request_id=request_id)
    return await _done(work, request_id)


def _run_pack_active(active: bool) -> Runner:
    async def run(
        state: AppState, work: UnitOfWork, session: Session, fields: dict[str, str], rid: str
    ) -> Done:
        conn = await work.connection()
        await _unused(conn, rid)
        await packs.update_pack(
            conn, session.operator, fields["pack_id"], {"active": active}, request_id=rid
        )
        return await _done(work, rid)

    return run


async def _run_create_plan(
    state: AppState, work: UnitOfWork, session: Session, fields: dict[str, str], request_id: str
) -> Done:
    conn = await work.connection()
    await _unused(conn, request_id)
    plan = plans.Plan(**_valid(PlanCreate, fields, PLAN_FIELDS).model_dump())
    await plans.create_plan(conn, session.operator, plan, request_id=request_id)
    return await _done(work, request_id)


async def _run_account_plan(
    state: AppState, work: UnitOfWork, session: Session, fields: dict[str, str], request_id: str
) -> Done:
    conn = await work.connection()
    await _unused(conn, request_id)
    row = (
        await conn.execute(select(accounts).where(accounts.c.id == fields["account_id"]))
    ).first()
    if row is None:
        raise AccountNotFound(f"No account {fields['account_id']}")
    await plans.set_account_plan(
        conn,
        session.operator,
        state.pricing,
        Identity(row.oauth_provider, row.external_id),
        fields["plan_name"],
        request_id=request_id,
    )
    return await _done(work, request_id, row.id)


async def _run_create_code(
    state: AppState, work: UnitOfWork, session: Session, fields: dict[str, str], request_id: str
) -> Done:
    conn = await work.connection()
    await _unused(conn, request_id)
    code = codes.PromotionCode(**_valid(PromotionCodeCreate, fields, CODE_FIELDS).model_dump())
    await codes.create_code(conn, session.operator, code, request_id=request_id)
    return await _done(work, request_id)


async def _run_deactivate_code(
    state: AppState, work: UnitOfWork, session: Session, fields: dict[str, str], request_id: str
) -> Done:
    conn = await work.connection()
    await _unused(conn, request_id)
    await codes.update_code(
        conn, session.operator, fields["code"], {"active": False}, request_id=request_id
    )
    return await _done(work, request_id)


async def _plan_archive(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    return await _plan_pack_active(state, work, form, False)


async def _plan_unarchive(state: AppState, work: UnitOfWork, form: dict[str, str]) -> Plan:
    return await _plan_pack_active(state, work, form, True)


CATALOG_ACTIONS: dict[str, tuple[Planner, Runner]] = {
    "create_pack": (_plan_create_pack, _run_create_pack),
    "archive_pack": (_plan_archive, _run_pack_active(False)),
    "unarchive_pack": (_plan_unarchive, _run_pack_active(True)),
    "create_plan": (_plan_create_plan, _run_create_plan),
    "account_plan": (_plan_account_plan, _run_account_plan),
    "create_promotion_code": (_plan_create_code, _run_create_code),
    "deactivate_promotion_code": (_plan_deactivate_code, _run_deactivate_code),
}
