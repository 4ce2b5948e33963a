"""The offer: how many free uses an account starts with, and what a purchase buys."""

from __future__ import annotations

from dataclasses import dataclass

from ciris_billing.config import Settings


@dataclass(frozen=True, slots=True)
class Pricing:
    free_uses_per_account: int
    paid_uses_per_purchase: int
    price_per_purchase_minor: int
    currency: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Pricing:
        return cls(
            free_uses_per_account=settings.free_uses_per_account,
            paid_uses_per_purchase=settings.paid_uses_per_purchase,
            price_per_purchase_minor=settings.price_per_purchase_minor,
            currency=settings.currency,
        )
