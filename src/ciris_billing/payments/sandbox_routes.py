"""The sandbox provider's endpoints: its stand-in for Stripe.js, the bank and the dashboard.

Same paths as before under /v1/billing/sandbox; each answers 404 sandbox_inactive when the
active provider is not the sandbox.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import idempotency
from ciris_billing.deps import (
    AdminKey,
    AppState,
    IdempotencyKeyHeader,
    StateDep,
    UnitOfWorkDep,
    json_response,
    replay_if_known,
    run_idempotent,
)
from ciris_billing.errors import ErrorOut, SandboxInactive, error_responses
from ciris_billing.payments.providers.base import PaymentResult
from ciris_billing.payments.providers.sandbox import SandboxProvider
from ciris_billing.payments.schemas import (
    SandboxAuthenticate,
    SandboxConfirm,
    SandboxDispute,
    SandboxPaymentOut,
    SandboxRefund,
)

router = APIRouter(prefix="/v1/billing", tags=["purchases"], responses=error_responses(422))


def _sandbox(state: AppState) -> SandboxProvider:
    if not isinstance(state.provider, SandboxProvider):
        raise SandboxInactive("The sandbox provider is not active (PAYMENT_PROVIDER=stripe)")
    return state.provider


def _sandbox_body(payment: PaymentResult) -> dict[str, Any]:
    return {
        "payment_id": payment.payment_id,
        "status": payment.provider_status,  # the sandbox imitates Stripe.js's answer
        "amount_minor": payment.amount_minor,
        "currency": payment.currency,
        "failure_message": payment.failure_message,
    }


@router.post(
    "/sandbox/payment_intents/{payment_id}/confirm",
    response_model=SandboxPaymentOut,
    tags=["sandbox"],
    responses={
        402: {"model": ErrorOut, "description": "Card declined"},
        **error_responses(404, 409),
    },
)
async def sandbox_confirm(payment_id: str, body: SandboxConfirm, state: StateDep) -> Response:
    """Sandbox only: pay with a test card (4242… succeeds, …9995 declines, …3155 needs 3DS)."""
    payment = await _sandbox(state).confirm_with_card(
        payment_id, body.client_secret, body.card_number, body.save_card
    )
    return json_response(200, _sandbox_body(payment))


@router.post(
    "/sandbox/payment_intents/{payment_id}/authenticate",
    response_model=SandboxPaymentOut,
    tags=["sandbox"],
    responses=error_responses(404, 409),
)
async def sandbox_authenticate(
    payment_id: str, body: SandboxAuthenticate, state: StateDep
) -> Response:
    """Sandbox only: complete (or fail) the 3D Secure step of a `requires_action` payment."""
    payment = await _sandbox(state).authenticate(payment_id, body.client_secret, body.success)
    return json_response(200, _sandbox_body(payment))


@router.post(
    "/sandbox/payment_intents/{payment_id}/dispute",
    tags=["sandbox"],
    responses=error_responses(401, 403, 404, 409),
)
async def sandbox_dispute(
    payment_id: str,
    body: SandboxDispute,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Sandbox only: the bank opens (or closes, won/lost) a chargeback; its webhook follows."""
    key = idempotency.resolve_key(idempotency_key)
    payload = {"payment_id": payment_id, **body.model_dump(mode="json")}
    replay = await replay_if_known(request, work, principal, key, payload)
    if replay is not None:
        return replay
    async with work.provider_call():  # the sandbox sends its webhook: no transaction held
        dispute = await _sandbox(state).dispute(payment_id, body.status)

    async def effect(_conn: AsyncConnection) -> tuple[int, Any]:
        return 200, {
            "dispute_id": dispute.dispute_id,
            "payment_id": payment_id,
            "status": body.status,
        }

    return await run_idempotent(request, work, principal, key, payload, effect)


@router.post(
    "/sandbox/payment_intents/{payment_id}/dashboard_refund",
    tags=["sandbox"],
    responses=error_responses(401, 403, 404, 409),
)
async def sandbox_dashboard_refund(
    payment_id: str,
    body: SandboxRefund,
    request: Request,
    state: StateDep,
    work: UnitOfWorkDep,
    principal: AdminKey,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Sandbox only: a refund made in the provider's dashboard, outside this service; only its
    `charge.refunded` webhook tells us."""
    key = idempotency.resolve_key(idempotency_key)
    payload = {"payment_id": payment_id, **body.model_dump(mode="json")}
    replay = await replay_if_known(request, work, principal, key, payload)
    if replay is not None:
        return replay
    async with work.provider_call():  # the sandbox sends its webhook: no transaction held
        refund_id = await _sandbox(state).refund_payment(payment_id, body.amount_minor)

    async def effect(_conn: AsyncConnection) -> tuple[int, Any]:
        return 200, {"refund_id": refund_id, "payment_id": payment_id}

    return await run_idempotent(request, work, principal, key, payload, effect)
