"""HTTP routes for reservations (holds). Thin: parse, call accounts/reservations.py, render.

Each runs on the request's unit of work; reserve and capture through run_idempotent, so a retry
with the same Idempotency-Key replays the first answer (recorded in the same transaction).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.accounts import answers, reservations, service
from ciris_billing.accounts.checks import open_account
from ciris_billing.accounts.routes import identity_of, path_identity
from ciris_billing.accounts.schemas import (
    PurchaseRequiredOut,
    ReservationCapture,
    ReservationCaptureOut,
    ReservationCreate,
    ReservationOut,
    ReservationsOut,
)
from ciris_billing.checkout.links import buy_token, buy_url
from ciris_billing.db import iso
from ciris_billing.deps import (
    IdempotencyKeyHeader,
    ReadKey,
    StateDep,
    UnitOfWorkDep,
    WriteKey,
    json_response,
    run_idempotent,
)
from ciris_billing.errors import ErrorOut, InvalidRequest, PurchaseRequired, error_responses
from ciris_billing.observability import RESERVATIONS, log

router = APIRouter(prefix="/v1/billing", tags=["reservations"])

ERRORS = error_responses(401, 403, 422)
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No such reservation"}
}
ReservationId = Annotated[str, Path(min_length=1, max_length=40, examples=["rsv_3f9a"])]


def reservation_body(reservation: Any, account: Any) -> dict[str, Any]:
    """A reservation and its account's available counters (`reservation`, `account`: rows, or
    one joined row for both)."""
    r, a = reservation._mapping, account._mapping
    captured = r["captured_uses"]
    return {
        "reservation_id": r["id"],
        "account_id": r["account_id"],
        "oauth_provider": a["oauth_provider"],
        "external_id": a["external_id"],
        "status": r["status"],
        "uses": int(r["uses"]),
        "captured_uses": None if captured is None else int(captured),
        "charge_id": r["charge_id"],
        "expires_at": iso(r["expires_at"]),
        "metadata": dict(r["metadata"]),
        "held_uses": reservations.held_uses(a),
        "free_uses_remaining": int(a["free_uses_remaining"]),
        "credits_remaining": int(a["paid_uses_remaining"]),
        "total_uses": int(a["total_uses"]),
        "created_at": iso(r["created_at"]),
    }


@router.post(
    "/reservations",
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
    work: UnitOfWorkDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Hold uses for an interaction whose cost is known only at its end (free uses first)."""
    key = idempotency.resolve_key(idempotency_key)
    identity = identity_of(body)
    state.account_limits.check(f"{identity.oauth_provider}/{identity.external_id}", "account")
    if await service.find_account(await work.connection(), identity) is None:
        # As a check would: in a unit of work of its own (committed), so the account stays even
        # when this hold is refused. Safe when first requests race (ensure_account).
        await open_account(state.engine, identity, state.pricing)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        wanted = reservations.HoldRequest(
            identity=identity,
            uses=body.uses,
            ttl_seconds=body.ttl_seconds,
            metadata=body.metadata,
            api_key_id=principal.key_id,
            idempotency_key=key,
        )
        try:
            made = await reservations.hold(conn, wanted, state.pricing)
        except PurchaseRequired as refused:
            RESERVATIONS.labels("refused").inc()
            token = buy_token(state.link_secret, identity.oauth_provider, identity.external_id)
            refused.extra["checkout_url"] = buy_url(state.public_base_url(request), token)
            refused.extra["portal_url"] = answers.portal_link(state, request, identity)
            raise
        RESERVATIONS.labels("held").inc()
        log.info(
            "reservation_held",
            reservation_id=made.reservation.id,
            account_id=made.account.id,
            uses=body.uses,
            ttl_seconds=body.ttl_seconds,
        )
        return 201, reservation_body(made.reservation, made.account)

    payload = body.model_dump(mode="json")
    return await run_idempotent(request, work, principal, key, payload, effect)


@router.post(
    "/reservations/{reservation_id}/capture",
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
    work: UnitOfWorkDep,
    principal: WriteKey,
    body: ReservationCapture | None = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Charge the uses the interaction took (at most the held ones; all by default) as one
    charge, and release the rest."""
    body = body or ReservationCapture()
    key = idempotency.resolve_key(idempotency_key)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        wanted = reservations.CaptureRequest(
            reservation_id=reservation_id,
            uses=body.uses,
            amount_minor=body.amount_minor,
            description=body.description,
            metadata=body.metadata,
            api_key_id=principal.key_id,
        )
        made = await reservations.capture(conn, wanted)
        charge, account, held = made.charge, made.account, made.reservation
        assert charge is not None
        RESERVATIONS.labels("captured").inc()
        log.info(
            "reservation_captured",
            reservation_id=held.id,
            charge_id=charge.id,
            account_id=account.id,
            uses=int(charge.uses),
            released_uses=int(held.uses) - int(charge.uses),
        )
        return 201, {
            "charge_id": charge.id,
            "reservation_id": held.id,
            "status": "captured",
            "account_id": account.id,
            "oauth_provider": account.oauth_provider,
            "external_id": account.external_id,
            "uses": int(charge.uses),
            "released_uses": int(held.uses) - int(charge.uses),
            "free_uses_used": int(charge.free_uses_used),
            "paid_uses_used": int(charge.paid_uses_used),
            "amount_minor": int(charge.amount_minor),
            "currency": charge.currency,
            "description": charge.description,
            "metadata": dict(charge._mapping["metadata"]),
            "free_uses_remaining": int(account.free_uses_remaining),
            "credits_remaining": int(account.paid_uses_remaining),
            "balance_minor": int(account.paid_uses_remaining),
            "held_uses": reservations.held_uses(account._mapping),
            "total_uses": int(account.total_uses),
            "plan_name": account.plan_name,
            "created_at": iso(charge.created_at),
        }

    payload = body.model_dump(mode="json")
    return await run_idempotent(request, work, principal, key, payload, effect)


@router.post(
    "/reservations/{reservation_id}/release",
    response_model=ReservationOut,
    responses={409: {"model": ErrorOut, "description": "Already captured"}, **NOT_FOUND, **ERRORS},
)
async def release_reservation(
    reservation_id: ReservationId, work: UnitOfWorkDep, _key: WriteKey
) -> Response:
    """Give all the held uses back. Idempotent: releasing a released (or expired) hold answers
    it as it is."""
    made = await reservations.release(await work.connection(), reservation_id)
    if made.changed:
        RESERVATIONS.labels("released").inc()
        log.info(
            "reservation_released",
            reservation_id=made.reservation.id,
            account_id=made.account.id,
            uses=int(made.reservation.uses),
        )
    return json_response(200, reservation_body(made.reservation, made.account))


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
    return json_response(200, reservation_body(row, row))


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
            "reservations": [reservation_body(row, row) for row in rows],
            "limit": limit,
            "offset": offset,
        },
    )
