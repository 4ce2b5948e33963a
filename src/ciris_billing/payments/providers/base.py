"""The PaymentProvider protocol and the provider-neutral types it speaks.

Business code talks to payments only through this protocol; each provider module translates
its SDK's objects into these types, so nothing outside a provider module imports an SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ciris_billing.errors import BillingError

PaymentStatus = Literal[
    "requires_payment_method",
    "requires_confirmation",
    "requires_action",
    "processing",
    "requires_capture",
    "succeeded",
    "canceled",
]


@dataclass(frozen=True, slots=True)
class PaymentIntent:
    """What we ask a provider to collect (the guide's `create_payment_intent(intent)`)."""

    amount_minor: int
    currency: str  # ISO 4217, upper case
    purchase_id: str
    account_id: str
    idempotency_key: str  # derived from the local purchase id: a retry never charges twice
    customer_email: str | None = None


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """A payment as the provider sees it now."""

    payment_id: str
    status: PaymentStatus
    amount_minor: int
    currency: str  # upper case
    client_secret: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    failure_message: str | None = None
    amount_refunded_minor: int = 0


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A verified provider event. `payment_id` is set when the event names a payment."""

    event_id: str
    type: str
    payment_id: str | None
    created: int
    payload: dict[str, Any]


DisputeStatus = Literal[
    "warning_needs_response",
    "warning_under_review",
    "warning_closed",
    "needs_response",
    "under_review",
    "won",
    "lost",
]


@dataclass(frozen=True, slots=True)
class Dispute:
    """A chargeback as the provider sees it now, with the payment it disputes."""

    dispute_id: str
    payment_id: str | None
    status: str
    amount_minor: int


# Metadata keys we put on every payment, so an event can be traced back to its purchase.
PURCHASE_ID_KEY = "ciris_purchase_id"
ACCOUNT_ID_KEY = "ciris_account_id"


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


class PaymentProvider(Protocol):
    name: str
    publishable_key: str | None

    async def create_payment_intent(self, intent: PaymentIntent) -> PaymentResult: ...

    async def confirm_payment(self, payment_id: str) -> bool:
        """True when the payment has succeeded at the provider."""
        ...

    async def get_payment(self, payment_id: str) -> PaymentResult | None:
        """The payment's current state, or None when the provider does not know it."""
        ...

    async def verify_webhook(self, payload: bytes, signature: str) -> WebhookEvent:
        """Check the signature on the raw body (raise InvalidWebhookSignature), then parse."""
        ...

    async def refund_payment(
        self, payment_id: str, amount_minor: int | None, idempotency_key: str | None = None
    ) -> str:
        """Refund all (None) or part of a payment; returns the provider's refund id."""
        ...

    async def get_dispute(self, dispute_id: str) -> Dispute | None:
        """The dispute's current state, or None when the provider does not know it."""
        ...

    async def payment_for_charge(self, charge_id: str) -> str | None:
        """The payment a charge belongs to (disputes name a charge), or None if unknown."""
        ...

    async def aclose(self) -> None: ...
