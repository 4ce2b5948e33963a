"""The sandbox's test cards (the guide's, as Stripe test mode treats them): numbers, brands, what a
card does on the payment that uses it and when charged later."""

from __future__ import annotations

from ciris_billing.errors import CardDeclined

# The guide's test cards, and what Stripe test mode does with them.
CARD_SUCCEEDS = "4242424242424242"
CARD_DECLINED = "4000000000009995"  # insufficient funds
CARD_NEEDS_AUTHENTICATION = "4000002500003155"  # 3D Secure
CARD_CHARGE_DECLINED = "4000000000000341"
# Asks for authentication on every payment, off-session ones too (Stripe's test card).
CARD_ALWAYS_AUTHENTICATES = "4000002760003184"
NEEDS_AUTHENTICATION = {CARD_NEEDS_AUTHENTICATION, CARD_ALWAYS_AUTHENTICATES}
DECLINES = {
    CARD_DECLINED: "Your card has insufficient funds.",
    CARD_CHARGE_DECLINED: "Your card was declined.",
    "4000000000000002": "Your card was declined.",
}


def _luhn_ok(number: str) -> bool:
    digits = [int(d) for d in number]
    for i in range(len(digits) - 2, -1, -2):
        digits[i] = digits[i] * 2 - 9 if digits[i] > 4 else digits[i] * 2
    return sum(digits) % 10 == 0


def card_brand(number: str) -> str:
    """A test card's brand from its number, in Stripe's words."""
    if number.startswith("4"):
        return "visa"
    if number[:2] in ("51", "52", "53", "54", "55") or number.startswith("2"):
        return "mastercard"
    if number[:2] in ("34", "37"):
        return "amex"
    return "unknown"


def off_session_behaviour(number: str) -> str:
    """What a saved test card does when charged later, as in Stripe test mode: 0341 attaches
    fine and is declined when charged; 3184 always wants authentication; 3155 wants it only on
    the payment that saved it (Stripe's "authenticated once for off-session use")."""
    if number == CARD_CHARGE_DECLINED or number in DECLINES:
        return "declined"
    if number == CARD_ALWAYS_AUTHENTICATES:
        return "authentication_required"
    return "succeeds"


def normalize_card(number: str) -> str:
    digits = number.replace(" ", "").replace("-", "")
    if not digits.isdigit() or not 12 <= len(digits) <= 19 or not _luhn_ok(digits):
        raise CardDeclined("Your card number is incorrect.", decline_code="incorrect_number")
    return digits
