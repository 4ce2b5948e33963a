"""Errors the service answers with: each carries its HTTP status and a stable error code.

Every error leaves the service in one JSON shape: `{"error": code, "detail": message, ...extra}`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class BillingError(Exception):
    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.detail, **self.extra}


class InvalidRequest(BillingError):
    status_code = 422
    code = "validation_error"


class AuthenticationRequired(BillingError):
    status_code = 401
    code = "authentication_required"


class ScopeMissing(BillingError):
    status_code = 403
    code = "insufficient_scope"


class AccountNotFound(BillingError):
    status_code = 404
    code = "account_not_found"


class AccountSuspended(BillingError):
    status_code = 403
    code = "account_suspended"


class PurchaseRequired(BillingError):
    status_code = 402
    code = "purchase_required"


class CurrencyMismatch(BillingError):
    """A charge in another currency than its account's (SPEC.md)."""

    status_code = 422
    code = "currency_mismatch"


class IdempotencyKeyReused(BillingError):
    status_code = 409
    code = "idempotency_key_reused"


class RateLimited(BillingError):
    status_code = 429
    code = "rate_limited"


class CheckoutNotFound(BillingError):
    status_code = 404
    code = "checkout_not_found"


class PurchaseNotYetRecorded(BillingError):
    """A payment of ours whose purchase row is not visible yet: retry later."""

    status_code = 503
    code = "purchase_not_yet_recorded"


class PurchaseNoLongerPayable(BillingError):
    """A retried purchase whose payment the provider no longer knows."""

    status_code = 404
    code = "purchase_no_longer_payable"


class PurchaseNotFound(BillingError):
    status_code = 404
    code = "purchase_not_found"


class SandboxInactive(BillingError):
    status_code = 404
    code = "sandbox_inactive"


class RefundNotAllowed(BillingError):
    status_code = 409
    code = "refund_not_allowed"


class RefundExceedsPayment(BillingError):
    status_code = 422
    code = "refund_exceeds_payment"


class InvalidWebhookSignature(BillingError):
    status_code = 400
    code = "invalid_webhook_signature"


class ProviderError(BillingError):
    """The provider refused or failed a request (bad gateway)."""

    status_code = 502
    code = "payment_provider_error"


class ProviderUnavailable(BillingError):
    """The provider could not be reached; retry later."""

    status_code = 503
    code = "payment_provider_unavailable"


class CardDeclined(BillingError):
    status_code = 402
    code = "card_declined"


class PaymentNotFound(BillingError):
    status_code = 404
    code = "payment_not_found"


class PaymentStateConflict(BillingError):
    status_code = 409
    code = "payment_state_conflict"


class UnknownProvider(BillingError):
    status_code = 404
    code = "unknown_payment_provider"


class ReservationNotFound(BillingError):
    status_code = 404
    code = "reservation_not_found"


class ReservationExpired(BillingError):
    """Capture after the hold's expires_at, whether or not the expiry job has run yet."""

    status_code = 409
    code = "reservation_expired"


class ReservationNotHeld(BillingError):
    """The hold was already captured or released (by another request)."""

    status_code = 409
    code = "reservation_not_held"


class AdjustmentBelowZero(BillingError):
    status_code = 422
    code = "adjustment_below_zero"


class ActionAlreadyDone(BillingError):
    """A console confirmation submitted again: its action was applied the first time."""

    status_code = 409
    code = "action_already_done"


class CsrfRefused(BillingError):
    """A console form posted without its session's CSRF token (or with another one)."""

    status_code = 403
    code = "csrf_refused"


# The error shape, as OpenAPI declares it.
class AutoTopupNeedsCard(BillingError):
    """Auto top-up cannot be switched on without a saved card (pay once, ticking the box)."""

    status_code = 409
    code = "auto_topup_needs_card"


class WebhookEndpointNotFound(BillingError):
    status_code = 404
    code = "webhook_endpoint_not_found"


class WebhookDeliveryNotFound(BillingError):
    status_code = 404
    code = "webhook_delivery_not_found"


class WebhookUrlRefused(BillingError):
    """An endpoint URL that is not https (unless allowed), or that resolves to a loopback,
    private, link-local or metadata address (SSRF guard, events/ssrf.py)."""

    status_code = 422
    code = "webhook_url_refused"


class LotNotFound(BillingError):
    status_code = 404
    code = "lot_not_found"


class ReportNotFound(BillingError):
    """The console's CSV of a report or export that does not exist."""

    status_code = 404
    code = "report_not_found"


class LotNotOpen(BillingError):
    """A void of a lot already closed (used up, expired, voided or erased)."""

    status_code = 409
    code = "lot_not_open"


class PackNotFound(BillingError):
    status_code = 404
    code = "pack_not_found"


class PackNotOffered(BillingError):
    """A purchase of a pack that is archived, or not among the account's plan's packs."""

    status_code = 422
    code = "pack_not_offered"


class PlanNotFound(BillingError):
    status_code = 404
    code = "plan_not_found"


class PromotionCodeNotFound(BillingError):
    status_code = 404
    code = "promotion_code_not_found"


class PromotionCodeRefused(BillingError):
    """A purchase's promotion code that cannot be redeemed; `reason` says why: unknown,
    inactive, expired, exhausted, not_for_pack, already_redeemed."""

    status_code = 422
    code = "promotion_code_refused"


class CatalogConflict(BillingError):
    """A pack, plan or code that exists already (or a default one, which the environment
    defines)."""

    status_code = 409
    code = "catalog_conflict"


class FieldError(BaseModel):
    """One problem with the request (a 422 `validation_error` lists them in `errors`)."""

    field: str = Field(description="Where, dotted (e.g. `metadata.turn`); empty for the body")
    message: str
    type: str | None = Field(description="The validator's problem type, e.g. `missing`")


class ErrorOut(BaseModel):
    """Every error answer: a stable `error` code and a human `detail`; a 422 also `errors`."""

    model_config = ConfigDict(extra="allow")

    error: str
    detail: str
    errors: list[FieldError] | None = Field(
        default=None, description="On 422 validation_error: each problem with the request"
    )


ERROR_DESCRIPTIONS = {
    400: "Bad request",
    401: "No valid API key",
    402: "Payment required",
    403: "The key lacks the scope",
    404: "Not found",
    409: "Conflict (e.g. an idempotency key reused for another request)",
    413: "Request body too large",
    422: "Invalid request",
    429: "Too many requests for this API key or account; retry after Retry-After seconds",
    502: "The payment provider refused",
    503: "The payment provider or the database is unreachable; retry",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for the error statuses a route answers, all in the one error shape
    (FastAPI would otherwise declare its own 422 body, which this service never sends).
    A route that takes an API key (401) is also rate limited per key (429)."""
    if 401 in codes:
        codes = (*codes, 429)
    return {code: {"model": ErrorOut, "description": ERROR_DESCRIPTIONS[code]} for code in codes}
