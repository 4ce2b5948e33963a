"""The built-in sandbox provider: Stripe test mode on a laptop, with no account anywhere.

Payments live in the `sandbox_payments` table, disputes in `sandbox_disputes`: the sandbox's
own state, like Stripe's, which the inbox asks about (`get_dispute`) whatever an event says.
The customer's side (what Stripe.js does) is
`confirm_with_card` and `authenticate`, driven by the guide's test cards; every state change
sends a signed webhook (Stripe's header and HMAC scheme, the sandbox's own secret) through the
service's own webhook pipeline, exactly as a Stripe event would arrive.

Because the sandbox imitates Stripe on the wire, it stores Stripe's PaymentIntent statuses and
parses its events with `stripe_wire`, which maps both to our neutral types.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.db import insert_or_ignore, sandbox_disputes, sandbox_payments, utcnow
from ciris_billing.errors import (
    CardDeclined,
    InvalidWebhookSignature,
    PaymentNotFound,
    PaymentStateConflict,
    ProviderError,
)
from ciris_billing.observability import log
from ciris_billing.payments.providers import signing, stripe_wire
from ciris_billing.payments.providers.base import (
    Dispute,
    PaymentIntent,
    PaymentResult,
    WebhookEvent,
)

Deliver = Callable[[bytes, str], Awaitable[Any]]

# The guide's test cards, and what Stripe test mode does with them.
CARD_SUCCEEDS = "4242424242424242"
CARD_DECLINED = "4000000000009995"  # insufficient funds
CARD_NEEDS_AUTHENTICATION = "4000002500003155"  # 3D Secure
CARD_CHARGE_DECLINED = "4000000000000341"
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
    """The network of a card number, by its leading digits (as Stripe names brands)."""
    if number.startswith("4"):
        return "visa"
    if number[:2] in ("34", "37"):
        return "amex"
    if 51 <= int(number[:2]) <= 55 or 2221 <= int(number[:4]) <= 2720:
        return "mastercard"
    if number.startswith(("6011", "65")):
        return "discover"
    return "unknown"


def normalize_card(number: str) -> str:
    digits = number.replace(" ", "").replace("-", "")
    if not digits.isdigit() or not 12 <= len(digits) <= 19 or not _luhn_ok(digits):
        raise CardDeclined("Your card number is incorrect.", decline_code="incorrect_number")
    return digits


class SandboxProvider:
    name = "sandbox"
    publishable_key: str | None = None

    def __init__(self, engine: AsyncEngine, webhook_secret: str, deliver: Deliver | None) -> None:
        self._engine = engine
        self._secret = webhook_secret
        self._deliver = deliver

    async def create_payment_intent(self, intent: PaymentIntent) -> PaymentResult:
        payment_id = "pi_sbx_" + secrets.token_hex(12)
        now = utcnow()
        async with self._engine.begin() as conn:
            # Like Stripe's Idempotency-Key: the same key returns the intent made the first time.
            await conn.execute(
                insert_or_ignore(sandbox_payments).values(
                    id=payment_id,
                    idempotency_key=intent.idempotency_key,
                    amount_minor=intent.amount_minor,
                    currency=intent.currency.upper(),
                    status="requires_payment_method",
                    client_secret=f"{payment_id}_secret_{secrets.token_urlsafe(18)}",
                    metadata={
                        "ciris_purchase_id": intent.purchase_id,
                        "ciris_account_id": intent.account_id,
                    },
                    failure_message=None,
                    amount_refunded_minor=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            row = (
                await conn.execute(
                    select(sandbox_payments).where(
                        sandbox_payments.c.idempotency_key == intent.idempotency_key
                    )
                )
            ).one()
        if row.amount_minor != intent.amount_minor or row.currency != intent.currency.upper():
            raise ProviderError("Idempotency key reused with different parameters")
        return _result(row)

    async def get_payment(self, payment_id: str) -> PaymentResult | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(sandbox_payments).where(sandbox_payments.c.id == payment_id)
                )
            ).first()
        return None if row is None else _result(row)

    async def confirm_payment(self, payment_id: str) -> bool:
        payment = await self.get_payment(payment_id)
        return payment is not None and payment.state == "succeeded"

    async def verify_webhook(self, payload: bytes, signature: str) -> WebhookEvent:
        if not signing.verify(payload, signature, self._secret):
            raise InvalidWebhookSignature("Invalid webhook signature")
        return self.parse_event(payload)

    def parse_event(self, payload: bytes) -> WebhookEvent:
        return stripe_wire.parse_event(payload)

    async def refund_payment(
        self, payment_id: str, amount_minor: int | None, idempotency_key: str | None = None
    ) -> str:
        async with self._engine.begin() as conn:
            row = await _locked(conn, payment_id)
            # Refusals are the payment's state, not a provider failure: 409, as for disputes.
            if row.status != "succeeded":
                raise PaymentStateConflict("Only a succeeded payment can be refunded")
            left = row.amount_minor - row.amount_refunded_minor
            amount = left if amount_minor is None else amount_minor
            if amount <= 0 or amount > left:
                raise PaymentStateConflict("Refund amount exceeds what is left of the payment")
            await conn.execute(
                sandbox_payments.update()
                .where(sandbox_payments.c.id == payment_id)
                .values(
                    amount_refunded_minor=row.amount_refunded_minor + amount, updated_at=utcnow()
                )
            )
        # Like Stripe, a refund (from the API or the dashboard) is announced by charge.refunded.
        await self.send_event("charge.refunded", await self._charge_object(payment_id))
        return "re_sbx_" + secrets.token_hex(12)

    async def get_dispute(self, dispute_id: str) -> Dispute | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(sandbox_disputes).where(sandbox_disputes.c.id == dispute_id)
                )
            ).first()
        if row is None:
            return None
        return Dispute(
            row.id, row.payment_id, stripe_wire.dispute_state(row.status), int(row.amount_minor)
        )

    async def payment_for_charge(self, charge_id: str) -> str | None:
        payment_id = "pi_" + charge_id.removeprefix("ch_")
        return payment_id if await self.get_payment(payment_id) is not None else None

    async def dispute(self, payment_id: str, status: str) -> Dispute:
        """The bank's side (admin only, through the sandbox endpoint): open a chargeback on a
        paid payment, or change or close it (won / lost). Its webhook follows."""
        async with self._engine.begin() as conn:
            row = await _locked(conn, payment_id)  # one change per payment at a time
            if row.status != "succeeded":
                raise PaymentStateConflict("Only a succeeded payment can be disputed")
            now = utcnow()
            # Safe under the payment's row lock: one dispute per payment (unique payment_id).
            await conn.execute(
                insert_or_ignore(sandbox_disputes).values(
                    id="dp_sbx_" + secrets.token_hex(12),
                    payment_id=payment_id,
                    status=status,
                    amount_minor=row.amount_minor,
                    currency=row.currency,
                    created_at=now,
                    updated_at=now,
                )
            )
            dispute_id = (
                await conn.execute(
                    sandbox_disputes.update()
                    .where(sandbox_disputes.c.payment_id == payment_id)
                    .values(status=status, updated_at=now)
                    .returning(sandbox_disputes.c.id)
                )
            ).scalar_one()
        closed = status in ("won", "lost", "warning_closed")
        event_type = "charge.dispute.closed" if closed else "charge.dispute.created"
        dispute = {
            "id": dispute_id,
            "object": "dispute",
            "charge": "ch_" + payment_id.removeprefix("pi_"),
            "status": status,
            "amount": int(row.amount_minor),
            "currency": row.currency.lower(),
        }
        await self.send_event(event_type, dispute)
        return Dispute(
            dispute_id, payment_id, stripe_wire.dispute_state(status), int(row.amount_minor)
        )

    async def _charge_object(self, payment_id: str) -> dict[str, Any]:
        payment = await self.get_payment(payment_id)
        assert payment is not None
        return {
            "id": "ch_" + payment_id.removeprefix("pi_"),
            "object": "charge",
            "payment_intent": payment_id,
            "amount": payment.amount_minor,
            "amount_refunded": payment.amount_refunded_minor,
            "currency": payment.currency.lower(),
            "refunded": payment.amount_refunded_minor == payment.amount_minor,
        }

    async def aclose(self) -> None:
        return None

    # The customer's side: what Stripe.js and the card network do in test mode.

    async def confirm_with_card(
        self, payment_id: str, client_secret: str, card_number: str
    ) -> PaymentResult:
        card = normalize_card(card_number)
        async with self._engine.begin() as conn:
            row = await _locked(conn, payment_id, client_secret)
            if row.status not in ("requires_payment_method", "requires_confirmation"):
                raise PaymentStateConflict(f"This payment is {row.status}; it cannot be confirmed")
            if card == CARD_NEEDS_AUTHENTICATION:
                status = "requires_action"
                failure = None
            elif card in DECLINES:
                status, failure = "requires_payment_method", DECLINES[card]
            else:
                status, failure = "succeeded", None
            await _set_status(conn, payment_id, status, failure)
            # As Stripe reports on the charge: the brand and last 4 digits, never the number.
            await conn.execute(
                sandbox_payments.update()
                .where(sandbox_payments.c.id == payment_id)
                .values(card_brand=card_brand(card), card_last4=card[-4:])
            )
        payment = await self._emit(payment_id)
        if failure is not None:
            raise CardDeclined(failure, payment_id=payment_id, status=payment.provider_status)
        return payment

    async def authenticate(
        self, payment_id: str, client_secret: str, success: bool
    ) -> PaymentResult:
        async with self._engine.begin() as conn:
            row = await _locked(conn, payment_id, client_secret)
            if row.status != "requires_action":
                raise PaymentStateConflict(f"This payment is {row.status}; nothing to authenticate")
            if success:
                await _set_status(conn, payment_id, "succeeded", None)
            else:
                await _set_status(
                    conn,
                    payment_id,
                    "requires_payment_method",
                    "The provided PaymentMethod has failed authentication.",
                )
        return await self._emit(payment_id)

    async def _emit(self, payment_id: str) -> PaymentResult:
        payment = await self.get_payment(payment_id)
        assert payment is not None
        event_type = {
            "succeeded": "payment_intent.succeeded",
            "requires_payment_method": "payment_intent.payment_failed",
            "requires_action": "payment_intent.requires_action",
        }.get(payment.provider_status)
        if event_type is not None:
            await self.send_event(event_type, _export(payment))
        return payment

    async def send_event(self, event_type: str, data_object: dict[str, Any]) -> None:
        """Sign an event like Stripe does and hand it to the service's webhook pipeline."""
        created = int(time.time())
        event = {
            "id": "evt_sbx_" + secrets.token_hex(12),
            "object": "event",
            "type": event_type,
            "created": created,
            "livemode": False,
            "data": {"object": data_object},
        }
        payload = json.dumps(event, separators=(",", ":")).encode()
        if self._deliver is None:
            return
        try:
            await self._deliver(payload, signing.sign(payload, self._secret, created))
        except Exception as exc:  # a failed delivery is what reconcile is for
            log.warning("sandbox_webhook_delivery_failed", event_type=event_type, error=str(exc))


async def _locked(conn: Any, payment_id: str, client_secret: str | None = None) -> Any:
    row = (
        await conn.execute(
            select(sandbox_payments).where(sandbox_payments.c.id == payment_id).with_for_update()
        )
    ).first()
    if row is None or (
        client_secret is not None
        # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, a 500).
        and not secrets.compare_digest(row.client_secret.encode(), client_secret.encode())
    ):
        raise PaymentNotFound("No such payment intent (or wrong client_secret)")
    return row


async def _set_status(conn: Any, payment_id: str, status: str, failure: str | None) -> None:
    await conn.execute(
        sandbox_payments.update()
        .where(sandbox_payments.c.id == payment_id)
        .values(status=status, failure_message=failure, updated_at=utcnow())
    )


def _result(row: Any) -> PaymentResult:
    return PaymentResult(
        payment_id=row.id,
        state=stripe_wire.payment_state(row.status, declined=row.failure_message is not None),
        amount_minor=int(row.amount_minor),
        currency=row.currency,
        provider_status=row.status,
        client_secret=row.client_secret,
        metadata=dict(row.metadata),
        failure_message=row.failure_message,
        amount_refunded_minor=int(row.amount_refunded_minor),
        card_brand=row.card_brand,
        card_last4=row.card_last4,
    )


def _export(payment: PaymentResult) -> dict[str, Any]:
    """The payment as a Stripe-shaped `payment_intent` object (no client secret)."""
    return {
        "id": payment.payment_id,
        "object": "payment_intent",
        "amount": payment.amount_minor,
        "currency": payment.currency.lower(),
        "status": payment.provider_status,
        "metadata": payment.metadata,
        "last_payment_error": (
            {"message": payment.failure_message} if payment.failure_message else None
        ),
    }
