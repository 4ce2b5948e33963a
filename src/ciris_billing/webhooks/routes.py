"""`POST /v1/billing/webhooks/{provider}`: the signature is the credential (no API key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ciris_billing.deps import StateDep, UnitOfWorkDep, json_response
from ciris_billing.errors import ErrorOut, UnknownProvider, error_responses
from ciris_billing.webhooks import inbox

router = APIRouter(prefix="/v1/billing/webhooks", tags=["webhooks"])


@router.post(
    "/{provider_name}",
    responses={
        **error_responses(413, 422),
        400: {"model": ErrorOut, "description": "Bad or missing signature"},
        404: {"model": ErrorOut, "description": "No such payment provider is active"},
        503: {"model": ErrorOut, "description": "Not handled yet; the provider retries"},
    },
)
async def receive_webhook(
    provider_name: str, request: Request, state: StateDep, work: UnitOfWorkDep
) -> Response:
    """Events from the payment provider, verified by their `Stripe-Signature` header."""
    provider = state.provider
    if provider.name != provider_name:
        raise UnknownProvider(f"No payment provider '{provider_name}' is active here")
    # Oversized bodies never get here: BodySizeLimitMiddleware answers 413 (MAX_REQUEST_BYTES).
    payload = await request.body()
    handled = await inbox.receive(
        work,
        provider,
        payload,
        request.headers.get("stripe-signature"),
        retry_base_seconds=state.settings.jobs_poll_seconds,
    )
    return json_response(
        200, {"received": True, "event_id": handled.event_id, "outcome": handled.outcome}
    )
