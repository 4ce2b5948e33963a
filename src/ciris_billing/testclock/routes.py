"""`GET /v1/billing/test_clock` (read key) and `POST /v1/billing/test_clock/advance` (admin
key): the sandbox's test clock. With Stripe both answer 404 `sandbox_inactive`, like the
sandbox's other routes, and the clock is never offset."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, StrictInt
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import clock, idempotency
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
from ciris_billing.request_body import RequestBody
from ciris_billing.testclock import store

router = APIRouter(prefix="/v1/billing", tags=["sandbox"], responses=error_responses(401, 403, 404))


class ClockAdvance(RequestBody):
    seconds: StrictInt = Field(
        ge=1,
        le=store.MAX_ADVANCE_SECONDS,
        description="How far to move the installation's clock forward (at most 10 years)",
    )


class ClockOut(BaseModel):
    now: str = Field(description="The installation's time, RFC 3339, UTC")
    offset_seconds: int = Field(description="How far it is ahead of the real time")
    sandbox: bool = Field(description="Always true: the test clock exists only in the sandbox")


@router.get("/test_clock", response_model=ClockOut)
async def get_test_clock(state: StateDep, _principal: ReadKey) -> Response:
    """Sandbox only: the installation's "now", real time plus the test clock's offset, as
    this process applies it (no database read; every process has it once an advance answered)."""
    store.require_sandbox(state.settings)
    return json_response(200, store.Clock(clock.offset_seconds()).body())


@router.post("/test_clock/advance", response_model=ClockOut, responses=error_responses(409, 422))
async def advance_test_clock(
    body: ClockAdvance,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Sandbox only: move the installation's clock forward for every time rule (hold TTLs,
    link lifetimes, the auto top-up's month, event times). Answers once every process of the
    installation has seen it (about 1.5 s). Forward only; recorded in the audit trail."""
    store.require_sandbox(state.settings)
    key = idempotency.resolve_key(idempotency_key)
    advanced: list[store.Clock] = []

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        advanced.append(await store.advance(conn, api_operator(principal), body.seconds))
        return 200, advanced[0].body()

    response = await run_idempotent(request, work, principal, key, body.model_dump(), effect)
    # Committed before waiting (unit_of_work.py): the other processes read the committed row.
    await work.commit()
    if advanced:
        clock.set_offset(advanced[0].offset_seconds)  # this process at once
    await asyncio.sleep(clock.SETTLE_SECONDS)  # the others within a refresh period or two
    return response
