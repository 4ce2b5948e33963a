"""HTTP routes for purchases and refunds (the sandbox's own endpoints: sandbox_routes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import audit_trail, idempotency
from ciris_billing.accounts import service as accounts
from ciris_billing.accounts.answers import portal_link
from ciris_billing.audit_trail import Entry, api_operator
from ciris_billing.checkout.links import checkout_url
from ciris_billing.db import iso
from ciris_billing.deps import (
    AdminKey,
    AppState,
    IdempotencyKeyHeader,
    ReadKey,
    StateDep,
    UnitOfWorkDep,
    WriteKey,
    json_response,
    replay_if_known,
    run_idempotent,
)
from ciris_billing.errors import error_responses
from ciris_billing.observability import PURCHASES, log
from ciris_billing.payments import refunds, service
from ciris_billing.payments.purchases import get_purchase as lookup_purchase
from ciris_billing.payments.schemas import PurchaseCreate, PurchaseOut, RefundCreate

router = APIRouter(prefix="/v1/billing", tags=["purchases"], responses=error_responses(422))


def purchase_body(
    purchase: Row[Any], state: AppState, client_secret: str | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "purchase_id": purchase.id,
        "payment_id": purchase.payment_id,
        "amount_minor": int(purchase.amount_minor),
        "currency": purchase.currency,
        "uses_purchased": int(purchase.uses),
        "pack_id": purchase.pack_id or "default",
        "promotion_code": purchase.promotion_code,
        "status": service.api_status(purchase.status),
        "provider": purchase.provider,
        "account_id": purchase.account_id,
        "credited": purchase.credited_at is not None,
        "failure_message": purchase.failure_message,
        "created_at": iso(purchase.created_at),
        "updated_at": iso(purchase.updated_at),
    }
    if client_secret is not None:
        body["client_secret"] = client_secret
    if state.provider.publishable_key:
        body["publishable_key"] = state.provider.publishable_key
    return body


@router.post(
    "/purchases",
    response_model=PurchaseOut,
    status_code=201,
    responses=error_responses(401, 403, 409, 502, 503),
)
async def create_purchase(
    body: PurchaseCreate,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Start buying uses: a payment intent with the provider, paid with its `client_secret`."""
    key = idempotency.resolve_key(idempotency_key)
    payload = body.model_dump(mode="json")
    replay = await replay_if_known(request, work, principal, key, payload)
    if replay is not None:
        return replay
    # The purchase id derives from the key as this API key's: another API key's purchase under
    # the same key is another purchase (never its payment, nor its client_secret).
    order = service.PurchaseOrder(
        accounts.Identity(body.oauth_provider, body.external_id),
        body.customer_email,
        None if key is None else service.scoped_key(principal.key_id, key),
        body.pack_id,
        body.promotion_code,
    )
    started = await service.start_purchase(work, state.provider, state.pricing, order)

    async def effect(_conn: AsyncConnection) -> tuple[int, Any]:
        answer = purchase_body(started.purchase, state, started.payment.client_secret)
        if started.payment.client_secret:
            answer["checkout_url"] = checkout_url(
                state.public_base_url(request),
                started.payment.payment_id,
                started.payment.client_secret,
            )
        answer["portal_url"] = portal_link(state, request, order.identity, "write")
        return 201, answer

    response = await run_idempotent(request, work, principal, key, payload, effect)
    PURCHASES.labels(state.provider.name, "created").inc()
    log.info(
        f"{state.provider.name}_purchase_created",
        payment_id=started.payment.payment_id,
        purchase_id=started.purchase.id,
        account_id=started.purchase.account_id,
        amount_minor=started.offer.amount_minor,
    )
    return response


@router.post(
    "/purchases/{payment_id}/refund",
    status_code=201,
    responses=error_responses(401, 403, 404, 409, 502, 503),
)
async def refund_purchase(
    payment_id: str,
    body: RefundCreate,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Refund all or part of a purchase; the refunded share of its uses goes back (rounded up),
    never below zero (a shortfall is recorded). The refund's webhook changes nothing more.
    409 while the purchase has an open dispute (or after a lost one), as at Stripe."""
    key = idempotency.resolve_key(idempotency_key, body.idempotency_key)
    payload = {
        "payment_id": payment_id,
        **body.model_dump(mode="json", exclude={"idempotency_key"}),
    }
    replay = await replay_if_known(request, work, principal, key, payload)
    if replay is not None:
        return replay
    before = await lookup_purchase(await work.connection(), state.provider.name, payment_id)
    # This API key's key: another API key's refund under the same key is another refund.
    provider_key = (
        None if key is None else f"refund-{payment_id}-{service.scoped_key(principal.key_id, key)}"
    )
    made = await refunds.make_refund(
        work, state.provider, payment_id, body.amount_minor, provider_key
    )

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        result = await refunds.record_refund(conn, state.provider.name, made, body.reason)
        entry = Entry(
            "refund",
            before.account_id,
            payment_id,
            {
                "amount_minor": made.amount_minor,
                "currency": result["currency"],
                "refund_id": made.refund_id,
                "uses_reversed": result["uses_reversed"],
                "shortfall_uses": result["shortfall_uses"],
                "reason": body.reason,
            },
            {"refunded_minor": int(before.refunded_minor)},
            {"refunded_minor": result["refunded_minor"], "status": result["purchase_status"]},
        )
        await audit_trail.record_action(conn, api_operator(principal), entry)
        return 201, result

    response = await run_idempotent(request, work, principal, key, payload, effect)
    log.info(
        f"{state.provider.name}_refund_created",
        payment_id=payment_id,
        amount_minor=made.amount_minor,
    )
    return response


@router.get(
    "/purchases/{payment_id}", response_model=PurchaseOut, responses=error_responses(401, 403, 404)
)
async def get_purchase(
    payment_id: str, state: StateDep, work: UnitOfWorkDep, _key: ReadKey
) -> Response:
    """A purchase's status (`succeeded` once its uses are credited)."""
    conn = await work.connection()
    # A purchase a promotion code made free has no payment at the provider (its own id).
    free = await service.find_purchase(conn, service.FREE_PROVIDER, payment_id)
    purchase = free or await lookup_purchase(conn, state.provider.name, payment_id)
    return json_response(200, purchase_body(purchase, state))


@router.post(
    "/purchases/{payment_id}/sync",
    response_model=PurchaseOut,
    responses=error_responses(401, 403, 404, 409, 502, 503),
)
async def sync_purchase(
    payment_id: str,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: WriteKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """The provider told the client the payment succeeded: the service asks the provider
    itself and, if paid, credits the purchase now (once, as its webhook would). The purchase
    after it (`succeeded` once credited). Without a key, asking again asks the provider again."""
    key = idempotency.resolve_key(idempotency_key)
    replay = await replay_if_known(request, work, principal, key, {})
    if replay is not None:
        return replay
    purchase = await lookup_purchase(await work.connection(), state.provider.name, payment_id)
    async with work.provider_call():
        payment = await state.provider.get_payment(purchase.payment_id)
    if payment is not None:
        await service.confirm_paid(work, state.provider.name, payment)

    async def effect(conn: AsyncConnection) -> tuple[int, Any]:
        found = await lookup_purchase(conn, state.provider.name, payment_id)
        return 200, purchase_body(found, state)

    return await run_idempotent(request, work, principal, key, {}, effect)
