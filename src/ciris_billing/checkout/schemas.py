"""What the payment page reads: the checkout summary."""

from __future__ import annotations

from pydantic import BaseModel, Field


class CheckoutSummary(BaseModel):
    payment_id: str
    uses: int = Field(description="Uses this purchase buys")
    uses_purchased: int
    amount_minor: int
    currency: str
    price: str = Field(examples=["$5.00"])
    status: str = Field(description="The purchase: `succeeded` once its uses are credited")
    payment_status: str = Field(description="The payment as the provider reports it now")
    credited: bool
    failure_message: str | None
    free_uses_remaining: int
    credits_remaining: int = Field(description="Paid uses left on the account")
    provider: str
    publishable_key: str | None = Field(default=None, description="Stripe mode only")
    save_card: bool = Field(
        default=False, description="The payer asked to keep the card for auto top-up"
    )
