"""An account's lots (read key) and an operator's void of one (admin key)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.accounts import lots
from ciris_billing.accounts.routes import path_identity
from ciris_billing.accounts.schemas import LotsOut, LotVoid, LotVoidOut
from ciris_billing.audit_trail import api_operator
from ciris_billing.deps import (
    AdminKey,
    IdempotencyKeyHeader,
    ReadKey,
    UnitOfWorkDep,
    json_response,
    run_idempotent,
)
from ciris_billing.errors import error_responses
from ciris_billing.observability import log

router = APIRouter(prefix="/v1/billing", tags=["lots"], responses=error_responses(401, 403, 422))

LotId = Annotated[str, Path(min_length=1, max_length=40, examples=["lot_0123456789abcdef"])]


@router.get(
    "/accounts/{oauth_provider}/{external_id}/lots",
    response_model=LotsOut,
    responses=error_responses(404),
)
async def list_lots(
    oauth_provider: Annotated[str, Path(examples=["oauth:google"])],
    external_id: Annotated[str, Path(examples=["user@example.com"])],
    work: UnitOfWorkDep,
    _key: ReadKey,
    include: Annotated[
        Literal["active", "expired", "all"],
        Query(description="`expired` or `all`: the closed lots too, after the open ones"),
    ] = "active",
) -> Response:
    """The account's lots: the open ones first, in the order uses are taken from them."""
    identity = path_identity(oauth_provider, external_id)
    listed = await lots.list_lots(await work.connection(), identity, include)
    return json_response(200, {"lots": listed})


@router.post("/lots/{lot_id}/void", response_model=LotVoidOut, responses=error_responses(404, 409))
async def void_lot(
    lot_id: LotId,
    body: LotVoid,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Void what a lot has left (uses held by open holds stay theirs); recorded in the audit
    trail. 409 when the lot is already closed."""
    key = idempotency.resolve_key(idempotency_key)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        closed, _entry = await lots.void(conn, api_operator(principal), lot_id, body.reason, key)
        log.info("lot_voided", lot_id=lot_id, account_id=closed.account_id, uses=closed.uses)
        return 200, lots.void_body(closed, body.reason)

    payload = {"lot_id": lot_id, **body.model_dump(mode="json")}
    return await run_idempotent(request, work, principal, key, payload, effect)
