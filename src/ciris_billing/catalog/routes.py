"""HTTP routes of the catalog: packs, plans, promotion codes (read key to list; admin key to
change, each change an audit row) and an account's plan."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import Response
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.accounts.routes import path_identity
from ciris_billing.audit_trail import api_operator
from ciris_billing.catalog import codes, packs, plans
from ciris_billing.catalog.schemas import (
    AccountPlanChange,
    PackCreate,
    PackOut,
    PacksOut,
    PackUpdate,
    PlanCreate,
    PlanOut,
    PlansOut,
    PlanUpdate,
    PromotionCodeCreate,
    PromotionCodeOut,
    PromotionCodesOut,
    PromotionCodeUpdate,
)
from ciris_billing.deps import (
    AdminKey,
    IdempotencyKeyHeader,
    ReadKey,
    StateDep,
    UnitOfWorkDep,
    json_response,
    run_idempotent,
)
from ciris_billing.errors import InvalidRequest, error_responses
from ciris_billing.observability import log
from ciris_billing.unit_of_work import UnitOfWork

router = APIRouter(prefix="/v1/billing", tags=["catalog"], responses=error_responses(401, 403, 422))

PackIdPath = Annotated[str, Path(min_length=1, max_length=64, examples=["pro-eur"])]
PlanPath = Annotated[str, Path(min_length=1, max_length=32, examples=["pro"])]
CodePath = Annotated[str, Path(min_length=1, max_length=64, examples=["LAUNCH20"])]


def changes_of(body: BaseModel, not_null: tuple[str, ...]) -> dict[str, Any]:
    """The fields a PATCH sent (an explicit null clears a nullable one)."""
    changes = body.model_dump(exclude_unset=True)
    for name in not_null:
        if name in changes and changes[name] is None:
            raise InvalidRequest(f"{name} cannot be null")
    if not changes:
        raise InvalidRequest("Nothing to change")
    return changes


async def _admin_change(
    request: Request,
    work: UnitOfWork,
    principal: Any,
    idempotency_key: str | None,
    payload: dict[str, Any],
    effect: Any,
) -> Response:
    key = idempotency.resolve_key(idempotency_key)
    return await run_idempotent(request, work, principal, key, payload, effect)


@router.get("/packs", response_model=PacksOut)
async def list_packs(state: StateDep, work: UnitOfWorkDep, _key: ReadKey) -> Response:
    """Every pack: `default` (the environment's PAID_USES_PER_PURCHASE,
    PRICE_PER_PURCHASE_MINOR, CURRENCY) first, then the operators', archived ones too."""
    found = await packs.list_packs(await work.connection(), state.pricing)
    return json_response(200, {"packs": [pack.body() for pack in found]})


@router.post("/packs", response_model=PackOut, status_code=201, responses=error_responses(409))
async def create_pack(
    body: PackCreate,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Add a pack: `uses` for `price_minor` in `currency`; its lots expire after
    `expires_in_days` (default never)."""

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        made = await packs.create_pack(
            conn, api_operator(principal), packs.Pack(**body.model_dump())
        )
        log.info("pack_created", pack_id=made.pack_id)
        return 201, made.body()

    payload = {"action": "pack_create", **body.model_dump(mode="json")}
    return await _admin_change(request, work, principal, idempotency_key, payload, effect)


@router.patch("/packs/{pack_id}", response_model=PackOut, responses=error_responses(404, 409))
async def update_pack(
    pack_id: PackIdPath,
    body: PackUpdate,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Change a pack; `"active": false` archives it (no new purchases; one in flight is
    credited as it began). The default pack is the environment's (409)."""
    changes = changes_of(body, ("name", "uses", "price_minor", "active"))

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        after = await packs.update_pack(conn, api_operator(principal), pack_id, changes)
        log.info("pack_updated", pack_id=pack_id)
        return 200, after.body()

    payload = {"action": "pack_update", "pack_id": pack_id, **body.model_dump(mode="json")}
    return await _admin_change(request, work, principal, idempotency_key, payload, effect)


@router.get("/plans", response_model=PlansOut)
async def list_plans(state: StateDep, work: UnitOfWorkDep, _key: ReadKey) -> Response:
    """Every plan: `free` (the environment's FREE_USES_PER_ACCOUNT, FREE_USES_RESET, every
    pack) first. (`paid`, the plan a first purchase moves a `free` account to, has its terms.)"""
    found = await plans.list_plans(await work.connection(), state.pricing)
    return json_response(200, {"plans": [plan.body() for plan in found]})


@router.post("/plans", response_model=PlanOut, status_code=201, responses=error_responses(409))
async def create_plan(
    body: PlanCreate,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Add a plan: its free uses (`never` or `monthly`), its packs (`pack_ids`, null: all) and
    the balance.low threshold of the accounts that join it."""

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        made = await plans.create_plan(
            conn, api_operator(principal), plans.Plan(**body.model_dump())
        )
        log.info("plan_created", plan=made.name)
        return 201, made.body()

    payload = {"action": "plan_create", **body.model_dump(mode="json")}
    return await _admin_change(request, work, principal, idempotency_key, payload, effect)


@router.patch("/plans/{name}", response_model=PlanOut, responses=error_responses(404, 409))
async def update_plan(
    name: PlanPath,
    body: PlanUpdate,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Change a plan's terms: its accounts' free uses change from their next period."""
    changes = changes_of(body, ("free_uses", "free_uses_reset"))

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        after = await plans.update_plan(conn, api_operator(principal), name, changes)
        log.info("plan_updated", plan=name)
        return 200, after.body()

    payload = {"action": "plan_update", "name": name, **body.model_dump(mode="json")}
    return await _admin_change(request, work, principal, idempotency_key, payload, effect)


@router.patch("/accounts/{oauth_provider}/{external_id}", responses=error_responses(404, 409))
async def change_account_plan(
    oauth_provider: Annotated[str, Path(examples=["oauth:google"])],
    external_id: Annotated[str, Path(examples=["user@example.com"])],
    body: AccountPlanChange,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Move the account to another plan (`plan_name`). Free uses change from the next period
    (the free uses already granted stay); the plan's packs apply at once."""
    identity = path_identity(oauth_provider, external_id)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        row, plan = await plans.set_account_plan(
            conn, api_operator(principal), state.pricing, identity, body.plan_name
        )
        log.info("account_plan_changed", account_id=row.id, plan=plan.name)
        return 200, {
            "account_id": row.id,
            "plan_name": row.plan_name,
            "free_uses_remaining": int(row.free_uses_remaining),
            "credits_remaining": int(row.paid_uses_remaining),
        }

    payload = {"action": "account_plan", "path": [oauth_provider, external_id], **body.model_dump()}
    return await _admin_change(request, work, principal, idempotency_key, payload, effect)


@router.get("/promotion_codes", response_model=PromotionCodesOut)
async def list_promotion_codes(work: UnitOfWorkDep, _key: ReadKey) -> Response:
    """Every promotion code, with its redemptions so far."""
    found = await codes.list_codes(await work.connection())
    return json_response(200, {"promotion_codes": [code.body() for code in found]})


@router.post(
    "/promotion_codes",
    response_model=PromotionCodeOut,
    status_code=201,
    responses=error_responses(409),
)
async def create_promotion_code(
    body: PromotionCodeCreate,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Add a code: `percent_off` or `amount_off_minor` (in the pack's minor units), on
    `pack_ids` (null: every pack), at most `max_redemptions` times, `once_per_account` or not,
    until `expires_at`. A purchase names it as `promotion_code`."""
    if (body.percent_off is None) == (body.amount_off_minor is None):
        raise InvalidRequest("Give exactly one of percent_off and amount_off_minor")

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        made = await codes.create_code(
            conn, api_operator(principal), codes.PromotionCode(**body.model_dump())
        )
        log.info("promotion_code_created", code=made.code)
        return 201, made.body()

    payload = {"action": "promotion_code_create", **body.model_dump(mode="json")}
    return await _admin_change(request, work, principal, idempotency_key, payload, effect)


@router.patch(
    "/promotion_codes/{code}",
    response_model=PromotionCodeOut,
    responses=error_responses(404, 409),
)
async def update_promotion_code(
    code: CodePath,
    body: PromotionCodeUpdate,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Switch a code off (`"active": false`) or on, change its limit or expiry."""
    changes = changes_of(body, ("active",))

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        after = await codes.update_code(conn, api_operator(principal), code, changes)
        log.info("promotion_code_updated", code=code)
        return 200, after.body()

    payload = {"action": "promotion_code_update", "code": code, **body.model_dump(mode="json")}
    return await _admin_change(request, work, principal, idempotency_key, payload, effect)
