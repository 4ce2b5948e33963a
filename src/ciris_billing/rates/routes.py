"""Rate routes: list (read key) and set (admin key; setting a feature again replaces it)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.audit_trail import api_operator
from ciris_billing.deps import (
    AdminKey,
    IdempotencyKeyHeader,
    ReadKey,
    StateDep,
    UnitOfWorkDep,
    json_response,
    run_idempotent,
)
from ciris_billing.errors import error_responses
from ciris_billing.observability import log
from ciris_billing.rates import service
from ciris_billing.rates.schemas import RateOut, RateSet, RatesOut

router = APIRouter(prefix="/v1/billing", tags=["rates"], responses=error_responses(401, 403))


@router.get("/rates", response_model=RatesOut)
async def list_rates(work: UnitOfWorkDep, _principal: ReadKey) -> Response:
    """Every feature's rate."""
    rows = await service.all_rates(await work.connection())
    return json_response(200, {"rates": [service.rate_out(row) for row in rows]})


@router.post("/rates", response_model=RateOut, responses=error_responses(409, 422))
async def set_rate(
    body: RateSet,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Create a feature's rate, or replace it (the same feature again). Charges in this
    process use it at once, in others within RATES_REFRESH_SECONDS; an audit row each time."""
    rate = service.Rate(body.feature, body.units_per_use, body.rounding)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        out, _entry = await service.set_rate(conn, api_operator(principal), rate)
        log.info("rate_set", feature=rate.feature, units_per_use=rate.units_per_use)
        return 200, out

    key = idempotency.resolve_key(idempotency_key)
    response = await run_idempotent(
        request, work, principal, key, body.model_dump(mode="json"), effect
    )
    state.rate_book.forget()
    return response
