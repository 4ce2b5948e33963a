"""Operator routes (admin scope): grants, suspension, erasure and export."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.accounts import admin, lots, operator_actions
from ciris_billing.accounts.routes import account_body, identity_of, path_identity
from ciris_billing.accounts.schemas import (
    LOT_TERMS,
    AccountOut,
    GrantCreate,
    LowBalanceThreshold,
    StatusChange,
)
from ciris_billing.accounts.service import Identity
from ciris_billing.audit_trail import api_operator
from ciris_billing.auth import Principal
from ciris_billing.autotopup import cards
from ciris_billing.db import iso, utcnow
from ciris_billing.deps import (
    AdminKey,
    IdempotencyKeyHeader,
    StateDep,
    UnitOfWorkDep,
    json_response,
    run_idempotent,
)
from ciris_billing.errors import InvalidRequest, error_responses
from ciris_billing.observability import log
from ciris_billing.unit_of_work import UnitOfWork

# Every operator route needs the admin key and validates its input.
router = APIRouter(
    prefix="/v1/billing", tags=["operators"], responses=error_responses(401, 403, 422)
)


@router.post("/credits", status_code=201, responses=error_responses(409))
async def grant_credits(
    body: GrantCreate,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Grant (uses > 0) or take back (uses < 0) paid uses, with a reason; never below zero.
    A grant is a lot: `promotional` unless `paid` with `cost_basis_minor`, consumed by
    `priority` (lower first, default 100) and expiry (`expires_at` or `expires_in_days`;
    default never); the answer names it (`lot_id`)."""
    key = idempotency.resolve_key(idempotency_key, body.idempotency_key)
    if body.uses == 0:
        raise InvalidRequest("uses must not be 0")
    terms = lots.grant_terms(body, utcnow())

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        done = await operator_actions.grant(
            conn,
            api_operator(principal),
            identity_of(body),
            body.uses,
            body.reason,
            state.pricing,
            key,
            terms,
        )
        log.info("credits_granted", account_id=done.account.id, uses=body.uses, kind=done.kind)
        lot = done.lot_id is not None
        return 201, {
            "kind": done.kind,
            "uses": done.uses,
            "reason": body.reason,
            "lot_id": done.lot_id,
            "lot_kind": terms.kind if lot else None,
            "priority": terms.priority if lot else None,
            "expires_at": iso(terms.expires_at) if lot and terms.expires_at else None,
            "account": account_body(done.account),
        }

    # The lot's terms count only when given: a request of before them keeps its fingerprint.
    payload = {
        name: value
        for name, value in body.model_dump(mode="json", exclude={"idempotency_key"}).items()
        if name not in LOT_TERMS or value is not None
    }
    return await run_idempotent(request, work, principal, key, payload, effect)


async def _set_status(
    request: Request,
    work: UnitOfWork,
    principal: Principal,
    idempotency_key: str | None,
    identity: Identity,
    status: str,
    reason: str | None,
) -> Response:
    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        row = await operator_actions.set_status(
            conn, api_operator(principal), identity, status, reason
        )
        log.info(f"account_{status}", account_id=row.id)
        return 200, account_body(row) | {"status_reason": row.status_reason}

    key = idempotency.resolve_key(idempotency_key)
    payload = {"reason": reason} if status == "suspended" else {}
    return await run_idempotent(request, work, principal, key, payload, effect)


@router.post(
    "/accounts/{oauth_provider}/{external_id}/suspend",
    response_model=AccountOut,
    responses=error_responses(404, 409),
)
async def suspend_account(
    oauth_provider: str,
    external_id: str,
    body: StatusChange,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Suspend: charges are refused (403) and checks say why, until reactivated."""
    identity = path_identity(oauth_provider, external_id)
    return await _set_status(
        request, work, principal, idempotency_key, identity, "suspended", body.reason
    )


@router.post(
    "/accounts/{oauth_provider}/{external_id}/reactivate",
    response_model=AccountOut,
    responses=error_responses(404, 409),
)
async def reactivate_account(
    oauth_provider: str,
    external_id: str,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    identity = path_identity(oauth_provider, external_id)
    return await _set_status(request, work, principal, idempotency_key, identity, "active", None)


@router.put(
    "/accounts/{oauth_provider}/{external_id}/low_balance_threshold",
    responses=error_responses(404, 409),
)
async def set_low_balance_threshold(
    oauth_provider: str,
    external_id: str,
    body: LowBalanceThreshold,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """The account's own balance.low threshold (`null`: LOW_BALANCE_THRESHOLD_USES)."""
    identity = path_identity(oauth_provider, external_id)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        row, in_force = await operator_actions.set_low_balance_threshold(
            conn, api_operator(principal), identity, body.uses
        )
        log.info("low_balance_threshold_set", account_id=row.id, uses=body.uses)
        return 200, {
            "account_id": row.id,
            "low_balance_threshold_uses": body.uses,
            "threshold_in_force": in_force,
        }

    key = idempotency.resolve_key(idempotency_key)
    payload = body.model_dump(mode="json")
    return await run_idempotent(request, work, principal, key, payload, effect)


@router.delete("/accounts/{oauth_provider}/{external_id}", responses=error_responses(404, 409))
async def erase_account(
    oauth_provider: str,
    external_id: str,
    request: Request,
    work: UnitOfWorkDep,
    state: StateDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Erase the account's personal data; the ledger and its amounts stay. The saved card is
    detached at the provider once the erasure committed (if the provider is down, the
    recovery job detaches it later)."""
    identity = path_identity(oauth_provider, external_id)

    erased: list[str] = []

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        row = await operator_actions.erase(conn, api_operator(principal), identity)
        log.info("account_erased", account_id=row.id)
        erased.append(row.id)
        fields = list(admin.ERASED_FIELDS)
        return 200, {"account_id": row.id, "erased": True, "fields_erased": fields}

    key = idempotency.resolve_key(idempotency_key)
    response = await run_idempotent(request, work, principal, key, {}, effect)
    for account_id in erased:  # not on a replay: the first request (or the job) detached it
        async with work.provider_call():
            await cards.detach_erased_cards(state.engine, state.provider, account_id)
    return response


@router.get("/accounts/{oauth_provider}/{external_id}/export", responses=error_responses(404))
async def export_account(
    oauth_provider: str, external_id: str, work: UnitOfWorkDep, _key: AdminKey
) -> Response:
    """Everything held about the account, as JSON."""
    identity = path_identity(oauth_provider, external_id)
    data = await admin.export(await work.connection(), identity)
    return json_response(200, data)
