"""Request and response bodies for purchases and the sandbox's card confirmation."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field, StrictBool, StrictInt, StringConstraints

from ciris_billing.accounts.schemas import NO_NUL, Email, IdentityFields
from ciris_billing.request_body import RequestBody


class PurchaseCreate(IdentityFields):
    customer_email: Email | None = None
    pack_id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = Field(
        default=None, description="The pack to buy (GET /v1/billing/packs); default `default`"
    )
    promotion_code: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = (
        Field(default=None, description="A promotion code: the purchase is charged the discount")
    )


class PurchaseOut(BaseModel):
    purchase_id: str
    payment_id: str
    client_secret: str | None = Field(default=None, description="Only when the purchase is created")
    amount_minor: int
    currency: str
    uses_purchased: int
    pack_id: str | None = None
    promotion_code: str | None = None
    status: str
    provider: str
    publishable_key: str | None = Field(default=None, description="Where the provider has one")
    checkout_url: str | None = Field(
        default=None, description="The payment page (carries the client secret in its #fragment)"
    )
    portal_url: str | None = Field(
        default=None, description="The buyer's portal: balance, usage, receipts (on creation)"
    )
    account_id: str | None = None
    credited: bool | None = None
    failure_message: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


ClientSecret = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class SandboxConfirm(RequestBody):
    client_secret: ClientSecret
    card_number: Annotated[
        str,
        StringConstraints(min_length=12, max_length=23),
        Field(examples=["4242 4242 4242 4242"]),
    ]
    save_card: bool = Field(
        default=False,
        description="The payer's consent, with this confirmation, to keep the card for auto "
        "top-up (Stripe: `setup_future_usage`)",
    )


class SandboxAuthenticate(RequestBody):
    client_secret: ClientSecret
    success: StrictBool = True


class SandboxPaymentOut(BaseModel):
    payment_id: str
    status: str
    amount_minor: int
    currency: str
    failure_message: str | None


class RefundCreate(RequestBody):
    amount_minor: StrictInt | None = Field(
        default=None, ge=1, le=100_000_000, description="Partial refund; omit for the rest"
    )
    reason: Annotated[str, StringConstraints(max_length=500, pattern=NO_NUL)] | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None


class SandboxDispute(RequestBody):
    status: Annotated[
        str,
        StringConstraints(pattern=r"^(needs_response|under_review|won|lost|warning_closed)$"),
    ] = "needs_response"


class SandboxRefund(RequestBody):
    amount_minor: StrictInt | None = Field(default=None, ge=1, le=100_000_000)
