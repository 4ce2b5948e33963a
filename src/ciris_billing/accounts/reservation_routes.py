"""HTTP routes for reservations (holds). Thin: parse, call accounts/reservations.py, render.

Reserve and capture are answered by accounts/reservation_answers.py (which the fast path,
hot/asgi.py, calls too): one statement when they carry no Idempotency-Key, else a unit of work
of their own through run_idempotent, so a retry with the same key replays the first answer.
Release and the lookups run on the request's unit of work.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.accounts import reservation_answers, reservations
from ciris_billing.accounts.reservation_answers import CAPTURE_ROUTE, RESERVE_ROUTE
from ciris_billing.accounts.routes import path_identity
from ciris_billing.accounts.schemas import (
    PurchaseRequiredOut,
    ReservationCapture,
    ReservationCaptureOut,
    ReservationCreate,
    ReservationOut,
    ReservationsOut,
)
from ciris_billing.deps import (
    IdempotencyKeyHeader,
    ReadKey,
    StateDep,
    UnitOfWorkDep,
    WriteKey,
    json_response,
    run_idempotent,
)
from ciris_billing.errors import ErrorOut, InvalidRequest, error_responses
from ciris_billing.observability import RESERVATIONS, log

router = APIRouter(prefix="/v1/billing", tags=["reservations"])

ERRORS = error_responses(401, 403, 422)
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No such reservation"}
}
ReservationId = Annotated[str, Path(min_length=1, max_length=40, examples=["rsv_3f9a"])]


@router.post(
    RESERVE_ROUTE.removeprefix(router.prefix),
    response_model=ReservationOut,
    status_code=201,
    responses={
        402: {"model": PurchaseRequiredOut, "description": "Fewer uses available than asked"},
        409: {"model": ErrorOut, "description": "Idempotency key reused for another request"},
        **ERRORS,
    },
)
async def create_reservation(
    body: ReservationCreate,
    request: Request,
    state: StateDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Hold uses for an interaction whose cost is known only at its end (free uses first)."""
    return await reservation_answers.reserve(state, request, body, idempotency_key, principal)


@router.post(
    CAPTURE_ROUTE.removeprefix(router.prefix),
    response_model=ReservationCaptureOut,
    status_code=201,
    responses={
        409: {"model": ErrorOut, "description": "Expired, already captured or released"},
        **NOT_FOUND,
        **ERRORS,
    },
)
async def capture_reservation(
    reservation_id: ReservationId,
    request: Request,
    state: StateDep,
    principal: WriteKey,
    body: ReservationCapture | None = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Charge the uses the interaction took (at most the held ones; all by default) as one
    charge, and release the rest."""
    return await reservation_answers.capture(
        state, request, reservation_id, body or ReservationCapture(), idempotency_key, principal
    )


@router.post(
    "/reservations/{reservation_id}/release",
    response_model=ReservationOut,
    responses={409: {"model": ErrorOut, "description": "Already captured"}, **NOT_FOUND, **ERRORS},
)
async def release_reservation(
    reservation_id: ReservationId,
    request: Request,
    work: UnitOfWorkDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Give all the held uses back. Idempotent: releasing a released (or expired) hold answers
    it as it is; with an Idempotency-Key, the first answer is replayed."""

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        made = await reservations.release(conn, reservation_id)
        if made.changed:
            RESERVATIONS.labels("released").inc()
            log.info(
                "reservation_released",
                reservation_id=made.reservation.id,
                account_id=made.account.id,
                uses=int(made.reservation.uses),
            )
        return 200, reservation_answers.reservation_body(made.reservation, made.account)

    key = idempotency.resolve_key(idempotency_key)
    return await run_idempotent(request, work, principal, key, {}, effect)


@router.get(
    "/reservations/{reservation_id}",
    response_model=ReservationOut,
    responses={**NOT_FOUND, **ERRORS},
)
async def get_reservation(
    reservation_id: ReservationId, work: UnitOfWorkDep, _key: ReadKey
) -> Response:
    """One reservation."""
    row = await reservations.get(await work.connection(), reservation_id)
    return json_response(200, reservation_answers.reservation_body(row, row))


@router.get("/reservations", response_model=ReservationsOut, responses=ERRORS)
async def list_reservations(
    work: UnitOfWorkDep,
    _key: ReadKey,
    oauth_provider: Annotated[str | None, Query(examples=["oauth:google"])] = None,
    external_id: Annotated[str | None, Query(examples=["user@example.com"])] = None,
    status: Annotated[Literal["held", "captured", "released", "expired"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> Response:
    """Reservations, newest first: of one identity (both fields), and/or in one status."""
    if (oauth_provider is None) != (external_id is None):
        raise InvalidRequest("oauth_provider and external_id go together")
    identity = None
    if oauth_provider is not None and external_id is not None:
        identity = path_identity(oauth_provider, external_id)
    rows = await reservations.list_reservations(
        await work.connection(), identity, status, limit=limit, offset=offset
    )
    return json_response(
        200,
        {
            "reservations": [reservation_answers.reservation_body(row, row) for row in rows],
            "limit": limit,
            "offset": offset,
        },
    )
