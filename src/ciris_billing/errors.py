"""Errors the service answers with: each carries its HTTP status and a stable error code.

Every error leaves the service in one JSON shape: `{"error": code, "detail": message, ...extra}`.
"""

from __future__ import annotations

from typing import Any, ClassVar


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


class IdempotencyKeyReused(BillingError):
    status_code = 409
    code = "idempotency_key_reused"
