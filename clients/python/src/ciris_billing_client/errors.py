"""What the client raises. Every error carries the HTTP `status` (None when no response came),
the service's stable error `code` and a human `detail`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Offer:
    """What one purchase buys: `uses` uses for `price_minor` (minor units of `currency`)."""

    price_minor: int
    uses: int
    currency: str


class BillingError(Exception):
    """Any failure of a billing call; `body` is the service's JSON error body, when there is one."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        code: str = "billing_error",
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code
        self.body: Mapping[str, Any] = body or {}

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        return f"{self.code} ({where}): {self.detail}"


class AuthenticationError(BillingError):
    """401/403: the API key is missing, unknown, revoked, or lacks the scope for this call."""


class AccountSuspendedError(BillingError):
    """403 `account_suspended`: the account may not be charged."""


class NotFoundError(BillingError):
    """404: no such account, purchase or reservation."""


class IdempotencyConflictError(BillingError):
    """409: the idempotency key was already used for a different request."""


class ReservationStateError(BillingError):
    """409 on a reservation: it is no longer held (`ReservationNotHeldError`: captured or
    released already) or its time ran out (`ReservationExpiredError`)."""


class ReservationExpiredError(ReservationStateError):
    """409 `reservation_expired`: past its `expires_at` the hold cannot be captured; its uses
    went back to the account."""


class ReservationNotHeldError(ReservationStateError):
    """409 `reservation_not_held`: the hold was already captured or released."""


class PurchaseRequiredError(BillingError):
    """402: no free or paid use left (for a charge), or fewer than asked (for a hold). `offer`
    is what a purchase buys; `checkout_url` (when the service sends one) is the page where the
    user can pay; `portal_url` the user's portal (balance, usage history, receipts)."""

    def __init__(
        self,
        detail: str,
        *,
        offer: Offer,
        checkout_url: str | None = None,
        portal_url: str | None = None,
        status: int | None = 402,
        code: str = "purchase_required",
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, body=body)
        self.offer = offer
        self.checkout_url = checkout_url
        self.portal_url = portal_url


class BillingUnavailableError(BillingError):
    """Billing could not be reached: connection errors, timeouts or 5xx answers on every one of
    `attempts` tries (retries exhausted). `status` is the last HTTP status, if any."""

    def __init__(
        self,
        detail: str,
        *,
        attempts: int,
        status: int | None = None,
        code: str = "billing_unavailable",
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, status=status, code=code, body=body)
        self.attempts = attempts


__all__ = [
    "AccountSuspendedError",
    "AuthenticationError",
    "BillingError",
    "BillingUnavailableError",
    "IdempotencyConflictError",
    "NotFoundError",
    "Offer",
    "PurchaseRequiredError",
    "ReservationExpiredError",
    "ReservationNotHeldError",
    "ReservationStateError",
]
