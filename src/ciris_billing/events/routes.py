"""HTTP routes for webhook endpoints (admin scope). Thin: parse, call endpoints.py, render.

The URL's SSRF check resolves its host before the unit of work opens (no transaction waits on
DNS). Create and rotate answer with a secret shown once; both run through run_idempotent, so a
retry with the same Idempotency-Key replays the first answer.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import audit_trail, idempotency
from ciris_billing.audit_trail import Entry, api_operator
from ciris_billing.auth import Principal
from ciris_billing.db import iso
from ciris_billing.deps import (
    AdminKey,
    IdempotencyKeyHeader,
    StateDep,
    UnitOfWorkDep,
    json_response,
    run_idempotent,
)
from ciris_billing.errors import ErrorOut, error_responses
from ciris_billing.events import actions, endpoints, ssrf
from ciris_billing.events.schemas import (
    EndpointDeleted,
    WebhookDeliveriesOut,
    WebhookDeliveryOut,
    WebhookEndpointCreate,
    WebhookEndpointCreated,
    WebhookEndpointOut,
    WebhookEndpointsOut,
)
from ciris_billing.observability import log
from ciris_billing.unit_of_work import UnitOfWork

router = APIRouter(
    prefix="/v1/billing/webhook_endpoints",
    tags=["webhook endpoints"],
    responses=error_responses(401, 403, 422),
)
NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "No such endpoint (or delivery)"}
}
REUSED: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorOut, "description": "Idempotency key reused"}
}
EndpointId = Annotated[str, Path(min_length=1, max_length=40, examples=["we_3f9a"])]
DeliveryId = Annotated[str, Path(min_length=1, max_length=40, examples=["whd_3f9a"])]


@router.post(
    "",
    status_code=201,
    response_model=WebhookEndpointCreated,
    responses={409: {"model": ErrorOut, "description": "Idempotency key reused"}},
)
async def create_endpoint(
    body: WebhookEndpointCreate,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """A new endpoint, sent every event (or those named in `events`) from now on. The answer
    carries its signing secret, shown only this once."""
    await ssrf.safe_target(body.url, allow_private=state.settings.allow_private_webhook_urls)
    new = endpoints.NewEndpoint(body.url, body.events, body.description)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        row, secret = await endpoints.create(conn, new)
        log.info("webhook_endpoint_created", endpoint_id=row.id, events=row.events)
        entry = Entry("create_endpoint", None, row.id, {"events": row.events}, {}, _state(row))
        await audit_trail.record_action(conn, api_operator(principal), entry)
        return 201, endpoints.endpoint_body(row, secret)

    payload = body.model_dump(mode="json")
    key = idempotency.resolve_key(idempotency_key)
    return await run_idempotent(
        request, work, principal, key, payload, effect, kept=_without_secret
    )


def _without_secret(body: dict[str, Any]) -> dict[str, Any]:
    """What a replay of a creation or a rotation answers: the endpoint without its secret,
    shown only once (issue 21 finding 8: a stored answer never reveals it again, whatever
    became of the endpoint; a lost secret is replaced by rotate_secret)."""
    return {name: value for name, value in body.items() if name != "secret"}


def _state(row: Any) -> dict[str, Any]:
    return {"status": row.status, "events": row.events}


async def _audited(
    conn: AsyncConnection, principal: Principal, action: str, endpoint_id: str, row: Any
) -> None:
    entry = Entry(action, None, endpoint_id, {}, {}, {} if row is None else _state(row))
    await audit_trail.record_action(conn, api_operator(principal), entry)


@router.get("", response_model=WebhookEndpointsOut)
async def list_endpoints(work: UnitOfWorkDep, _key: AdminKey) -> Response:
    """Every endpoint, oldest first (secrets are never shown again)."""
    rows = await endpoints.list_endpoints(await work.connection())
    return json_response(200, {"data": [endpoints.endpoint_body(row) for row in rows]})


@router.get("/{endpoint_id}", response_model=WebhookEndpointOut, responses=NOT_FOUND)
async def get_endpoint(endpoint_id: EndpointId, work: UnitOfWorkDep, _key: AdminKey) -> Response:
    row = await endpoints.get(await work.connection(), endpoint_id)
    return json_response(200, endpoints.endpoint_body(row))


@router.delete("/{endpoint_id}", response_model=EndpointDeleted, responses={**NOT_FOUND, **REUSED})
async def delete_endpoint(
    endpoint_id: EndpointId,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Remove the endpoint and its deliveries: nothing more is sent to it."""

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        await endpoints.delete(conn, endpoint_id)
        log.info("webhook_endpoint_deleted", endpoint_id=endpoint_id)
        await _audited(conn, principal, "delete_endpoint", endpoint_id, None)
        return 200, {"id": endpoint_id, "deleted": True}

    key = idempotency.resolve_key(idempotency_key)
    return await run_idempotent(request, work, principal, key, {}, effect)


@router.post(
    "/{endpoint_id}/rotate_secret",
    response_model=WebhookEndpointCreated,
    responses={**NOT_FOUND, 409: {"model": ErrorOut, "description": "Idempotency key reused"}},
)
async def rotate_secret(
    endpoint_id: EndpointId,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """A new signing secret (shown only now). The old one keeps signing beside it for 24 hours
    (`previous_secret_expires_at`): deliveries carry both signatures meanwhile."""

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        row, secret = await endpoints.rotate_secret(conn, endpoint_id)
        log.info(
            "webhook_endpoint_secret_rotated",
            endpoint_id=row.id,
            previous_until=iso(row.previous_secret_expires_at),
        )
        await _audited(conn, principal, "rotate_secret", endpoint_id, row)
        return 200, endpoints.endpoint_body(row, secret)

    key = idempotency.resolve_key(idempotency_key)
    return await run_idempotent(request, work, principal, key, {}, effect, kept=_without_secret)


async def _set_enabled(
    request: Request,
    work: UnitOfWork,
    principal: Principal,
    idempotency_key: str | None,
    endpoint_id: str,
    enabled: bool,
) -> Response:
    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        entry, row = await actions.set_enabled(conn, endpoint_id, enabled)
        event = "webhook_endpoint_enabled" if enabled else "webhook_endpoint_disabled_by_operator"
        log.info(event, endpoint_id=row.id)
        await audit_trail.record_action(conn, api_operator(principal), entry)
        return 200, endpoints.endpoint_body(row)

    key = idempotency.resolve_key(idempotency_key)
    return await run_idempotent(request, work, principal, key, {}, effect)


@router.post(
    "/{endpoint_id}/disable",
    response_model=WebhookEndpointOut,
    responses={**NOT_FOUND, **REUSED},
)
async def disable_endpoint(
    endpoint_id: EndpointId,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Stop sending: its pending deliveries wait, and new events are not sent to it."""
    return await _set_enabled(request, work, principal, idempotency_key, endpoint_id, False)


@router.post(
    "/{endpoint_id}/enable", response_model=WebhookEndpointOut, responses={**NOT_FOUND, **REUSED}
)
async def enable_endpoint(
    endpoint_id: EndpointId,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Send again: pending deliveries go out when due; its run of failures starts anew."""
    return await _set_enabled(request, work, principal, idempotency_key, endpoint_id, True)


@router.get("/{endpoint_id}/deliveries", response_model=WebhookDeliveriesOut, responses=NOT_FOUND)
async def list_deliveries(
    endpoint_id: EndpointId,
    work: UnitOfWorkDep,
    _key: AdminKey,
    status: Literal["pending", "delivered", "failed"] | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
) -> Response:
    """The endpoint's deliveries, newest first: status, attempts, last answer, next try."""
    rows = await endpoints.deliveries(
        await work.connection(), endpoint_id, status, limit=limit, offset=offset
    )
    return json_response(
        200,
        {
            "data": [endpoints.delivery_body(row) for row in rows],
            "limit": limit,
            "offset": offset,
        },
    )


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/resend",
    status_code=202,
    response_model=WebhookDeliveryOut,
    responses={**NOT_FOUND, **REUSED},
)
async def resend_delivery(
    endpoint_id: EndpointId,
    delivery_id: DeliveryId,
    request: Request,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Send the delivery again (same event, same webhook-id) with the next delivery run."""

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        entry, row = await actions.resend(conn, endpoint_id, delivery_id)
        log.info("webhook_delivery_resend", endpoint_id=endpoint_id, delivery_id=delivery_id)
        await audit_trail.record_action(conn, api_operator(principal), entry)
        return 202, endpoints.delivery_body(row)

    key = idempotency.resolve_key(idempotency_key)
    return await run_idempotent(request, work, principal, key, {}, effect)
