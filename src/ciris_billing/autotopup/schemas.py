"""Request and response bodies of an account's auto top-up settings."""

from __future__ import annotations

from pydantic import BaseModel, Field, StrictBool

from ciris_billing.request_body import RequestBody


class AutoTopupUpdate(RequestBody):
    enabled: StrictBool


class AutoTopupOut(BaseModel):
    oauth_provider: str
    external_id: str
    enabled: bool
    card_saved: bool
    card_brand: str | None = Field(default=None, examples=["visa"])
    card_last4: str | None = Field(default=None, examples=["4242"])
    uses_per_topup: int = Field(description="Uses each top-up buys (the pack)")
    amount_minor: int
    currency: str
    threshold_uses: int = Field(description="A top-up starts when available uses fall below")
    max_per_month: int
    topups_this_month: int
    consecutive_failures: int
    disabled_reason: str | None = None
