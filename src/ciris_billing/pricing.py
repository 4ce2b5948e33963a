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
    # FREE_USES_RESET: "never" (the guide) or "monthly" (ledger/free_periods.py).
    free_uses_reset: str = "never"

    @property
    def monthly_free_uses(self) -> bool:
        return self.free_uses_reset == "monthly"

    @classmethod
    def from_settings(cls, settings: Settings) -> Pricing:
        return cls(
            free_uses_per_account=settings.free_uses_per_account,
            paid_uses_per_purchase=settings.paid_uses_per_purchase,
            price_per_purchase_minor=settings.price_per_purchase_minor,
            currency=settings.currency,
            free_uses_reset=settings.free_uses_reset,
        )
