"""What the payment page reads: the checkout summary."""

from __future__ import annotations

from pydantic import BaseModel, Field


class AutoTopupOffer(BaseModel):
    uses: int = Field(description="Uses each automatic top-up buys")
    amount_minor: int = Field(description="What the saved card is charged each time")
    price: str = Field(examples=["$5.00"])
    threshold_uses: int = Field(description="A top-up when available uses fall below this")
    max_per_month: int = Field(description="At most this many top-ups a calendar month")


class PackOffer(BaseModel):
    pack_id: str
    name: str
    uses: int
    price_minor: int
    currency: str
    expires_in_days: int | None
    active: bool
    price: str = Field(examples=["$5.00"])
    buy_url: str = Field(description="Starts a purchase of this pack instead (its payment page)")


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
    account_label: str = Field(
        description="Which account the uses go to, masked (`b•••@example.com (google)`)"
    )
    pack_id: str | None = Field(default=None, description="The pack this purchase buys")
    offers: list[PackOffer] = Field(
        default_factory=list, description="The packs the account may buy (the catalog)"
    )
    auto_topup: AutoTopupOffer = Field(
        description="What ticking the page's auto top-up box agrees to (it starts unticked; "
        "the consent is sent with the payment's confirmation)"
    )
