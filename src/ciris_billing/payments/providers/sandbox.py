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

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.db import (
    insert_or_ignore,
    sandbox_customers,
    sandbox_disputes,
    sandbox_payment_methods,
    sandbox_payments,
    utcnow,
)
from ciris_billing.errors import (
    CardDeclined,
    InvalidWebhookSignature,
    PaymentStateConflict,
    ProviderError,
)
from ciris_billing.payments.providers import signing, stripe_wire
from ciris_billing.payments.providers.base import (
    ACCOUNT_ID_KEY,
    PURCHASE_ID_KEY,
    Dispute,
    OffSessionPayment,
    PaymentIntent,
    PaymentResult,
    WebhookEvent,
)
from ciris_billing.payments.providers.sandbox_cards import (
    CARD_ALWAYS_AUTHENTICATES as CARD_ALWAYS_AUTHENTICATES,
)
from ciris_billing.payments.providers.sandbox_cards import (
    CARD_CHARGE_DECLINED as CARD_CHARGE_DECLINED,
)
from ciris_billing.payments.providers.sandbox_cards import CARD_DECLINED as CARD_DECLINED
from ciris_billing.payments.providers.sandbox_cards import (
    CARD_NEEDS_AUTHENTICATION as CARD_NEEDS_AUTHENTICATION,
)
from ciris_billing.payments.providers.sandbox_cards import CARD_SUCCEEDS as CARD_SUCCEEDS
from ciris_billing.payments.providers.sandbox_cards import DECLINES as DECLINES
from ciris_billing.payments.providers.sandbox_cards import (
    NEEDS_AUTHENTICATION as NEEDS_AUTHENTICATION,
)
from ciris_billing.payments.providers.sandbox_cards import card_brand as card_brand
from ciris_billing.payments.providers.sandbox_cards import normalize_card as normalize_card
from ciris_billing.payments.providers.sandbox_cards import (
    off_session_behaviour as off_session_behaviour,
)
from ciris_billing.payments.providers.sandbox_rows import (
    _attach_card,
    _export,
    _keep_card,
    _locked,
    _result,
    _set_status,
)
from ciris_billing.payments.providers.sandbox_webhooks import SandboxWebhooks

Deliver = Callable[[bytes, str], Awaitable[Any]]

# The event announcing a payment's new status (as Stripe's).
PAYMENT_EVENTS = {
    "succeeded": "payment_intent.succeeded",
    "requires_payment_method": "payment_intent.payment_failed",
    "requires_action": "payment_intent.requires_action",
}


class SandboxProvider:
    name = "sandbox"
    publishable_key: str | None = None

    def __init__(self, engine: AsyncEngine, webhook_secret: str, deliver: Deliver | None) -> None:
        self._engine = engine
        self._secret = webhook_secret
        self.webhooks = SandboxWebhooks(webhook_secret, deliver, self._event_object)

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
                        **intent.metadata,
                        "ciris_purchase_id": intent.purchase_id,
                        "ciris_account_id": intent.account_id,
                    },
                    failure_message=None,
                    amount_refunded_minor=0,
                    created_at=now,
                    updated_at=now,
                    customer_id=intent.customer_id,
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
            card = None
            if row is not None and row.payment_method_id is not None:
                card = (
                    await conn.execute(
                        select(sandbox_payment_methods).where(
                            sandbox_payment_methods.c.id == row.payment_method_id
                        )
                    )
                ).first()
        return None if row is None else _result(row, card)

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
            # Like Stripe, a refund (from the API or the dashboard) is announced by
            # charge.refunded, kept with the refund until the inbox takes it (redelivered).
            event_id = await self.webhooks.record(conn, "charge.refunded", payment_id)
        await self.webhooks.send(self._engine, event_id, "charge.refunded", payment_id)
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
            # Kept with the dispute's change until the inbox takes it (redelivered).
            event_id = await self.webhooks.record(conn, event_type, payment_id)
        await self.webhooks.send(self._engine, event_id, event_type, payment_id)
        return Dispute(
            dispute_id, payment_id, stripe_wire.dispute_state(status), int(row.amount_minor)
        )

    async def _dispute_object(self, payment_id: str) -> dict[str, Any]:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(sandbox_disputes).where(sandbox_disputes.c.payment_id == payment_id)
                )
            ).one()
        return {
            "id": row.id,
            "object": "dispute",
            "charge": "ch_" + payment_id.removeprefix("pi_"),
            "status": row.status,
            "amount": int(row.amount_minor),
            "currency": row.currency.lower(),
        }

    async def _event_object(self, event_type: str, payment_id: str) -> dict[str, Any]:
        """An event's `data.object` as it is when sent: the dispute, the charge (refunds) or
        the payment (the inbox asks the provider anyway, as it does of Stripe's events)."""
        if event_type.startswith("charge.dispute."):
            return await self._dispute_object(payment_id)
        if event_type.startswith("charge."):
            return await self._charge_object(payment_id)
        return await self._payment_object(payment_id)

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

    # Saved cards and off-session payments (auto top-up).

    async def create_customer(self, account_id: str, idempotency_key: str) -> str:
        async with self._engine.begin() as conn:
            # Like Stripe's Idempotency-Key: the same key returns the customer made first.
            await conn.execute(
                insert_or_ignore(sandbox_customers).values(
                    id="cus_sbx_" + secrets.token_hex(12),
                    account_id=account_id,
                    idempotency_key=idempotency_key,
                    created_at=utcnow(),
                )
            )
            found: str = (
                await conn.execute(
                    select(sandbox_customers.c.id).where(
                        sandbox_customers.c.idempotency_key == idempotency_key
                    )
                )
            ).scalar_one()
        return found

    async def pay_off_session(self, payment: OffSessionPayment) -> PaymentResult:
        payment_id = "pi_sbx_" + secrets.token_hex(12)
        now = utcnow()
        async with self._engine.begin() as conn:
            card = (
                await conn.execute(
                    select(sandbox_payment_methods)
                    .where(sandbox_payment_methods.c.id == payment.payment_method_id)
                    .with_for_update()
                )
            ).first()
            if card is None or card.customer_id != payment.customer_id or card.attached_at is None:
                raise ProviderError("The payment method is not attached to this customer")
            status, failure = {
                "succeeds": ("succeeded", None),
                "declined": ("requires_payment_method", "Your card was declined."),
                "authentication_required": ("requires_action", None),
            }[card.behaviour]
            # Like Stripe's Idempotency-Key: the same key returns the payment made first.
            inserted = await conn.execute(
                insert_or_ignore(sandbox_payments)
                .values(
                    id=payment_id,
                    idempotency_key=payment.idempotency_key,
                    amount_minor=payment.amount_minor,
                    currency=payment.currency.upper(),
                    status=status,
                    client_secret=f"{payment_id}_secret_{secrets.token_urlsafe(18)}",
                    metadata={
                        PURCHASE_ID_KEY: payment.purchase_id,
                        ACCOUNT_ID_KEY: payment.account_id,
                    },
                    failure_message=failure,
                    amount_refunded_minor=0,
                    created_at=now,
                    updated_at=now,
                    customer_id=payment.customer_id,
                    payment_method_id=payment.payment_method_id,
                    off_session=True,
                )
                .returning(sandbox_payments.c.id)
            )
            made = inserted.first() is not None
            row = (
                await conn.execute(
                    select(sandbox_payments).where(
                        sandbox_payments.c.idempotency_key == payment.idempotency_key
                    )
                )
            ).one()
        if not made:
            return _result(row)
        return await self._emit(row.id)

    async def find_payment(self, customer_id: str, purchase_id: str) -> PaymentResult | None:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(sandbox_payments).where(sandbox_payments.c.customer_id == customer_id)
            )
            for row in rows:
                if dict(row.metadata).get(PURCHASE_ID_KEY) == purchase_id:
                    return _result(row)
        return None

    async def detach_card(self, payment_method_id: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                sandbox_payment_methods.update()
                .where(sandbox_payment_methods.c.id == payment_method_id)
                .values(attached_at=None)
            )

    async def set_card_behaviour(self, payment_method_id: str, behaviour: str) -> None:
        """The bank's side (tests): a saved card starts being declined, or asking for
        authentication, or works again."""
        async with self._engine.begin() as conn:
            await conn.execute(
                sandbox_payment_methods.update()
                .where(sandbox_payment_methods.c.id == payment_method_id)
                .values(behaviour=behaviour)
            )

    # The customer's side: what Stripe.js and the card network do in test mode.

    async def confirm_with_card(
        self, payment_id: str, client_secret: str, card_number: str, save_card: bool = False
    ) -> PaymentResult:
        """The payer confirms with a card; `save_card` is their consent to keep it for
        off-session payments (Stripe's `setup_future_usage`), given with this confirmation
        only: whatever an earlier attempt said does not count."""
        card = normalize_card(card_number)
        async with self._engine.begin() as conn:
            row = await _locked(conn, payment_id, client_secret)
            if row.status not in ("requires_payment_method", "requires_confirmation"):
                raise PaymentStateConflict(f"This payment is {row.status}; it cannot be confirmed")
            if card in NEEDS_AUTHENTICATION:
                status = "requires_action"
                failure = None
            elif card in DECLINES:
                status, failure = "requires_payment_method", DECLINES[card]
            else:
                status, failure = "succeeded", None
            keep = save_card and row.customer_id is not None
            await conn.execute(
                sandbox_payments.update()
                .where(sandbox_payments.c.id == payment_id)
                .values(save_card=keep, payment_method_id=None)
            )
            if keep:
                await _keep_card(conn, row, card)
            await _set_status(conn, payment_id, status, failure)
            # As Stripe reports on the charge: the brand and last 4 digits, never the number.
            await conn.execute(
                sandbox_payments.update()
                .where(sandbox_payments.c.id == payment_id)
                .values(card_brand=card_brand(card), card_last4=card[-4:])
            )
            if status == "succeeded":
                await _attach_card(conn, payment_id)
            # With the change it announces: a worker killed after this commit loses nothing.
            event = await self._record_event(conn, payment_id, status)
        payment = await self._emit(payment_id, event)
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
                await _attach_card(conn, payment_id)
            else:
                await _set_status(
                    conn,
                    payment_id,
                    "requires_payment_method",
                    "The provided PaymentMethod has failed authentication.",
                )
            status = "succeeded" if success else "requires_payment_method"
            event = await self._record_event(conn, payment_id, status)
        return await self._emit(payment_id, event)

    async def _record_event(
        self, conn: Any, payment_id: str, status: str
    ) -> tuple[str, str] | None:
        """The payment's event for its new status, recorded in the caller's transaction."""
        event_type = PAYMENT_EVENTS.get(status)
        if event_type is None:
            return None
        return await self.webhooks.record(conn, event_type, payment_id), event_type

    async def _emit(
        self, payment_id: str, event: tuple[str, str] | bool | None = True
    ) -> PaymentResult:
        """Send the payment's event (recorded with its change, or now); redelivered by the
        jobs until the inbox takes it (sandbox_webhooks.py)."""
        payment = await self.get_payment(payment_id)
        assert payment is not None
        if event is True:
            async with self._engine.begin() as conn:
                event = await self._record_event(conn, payment_id, payment.provider_status)
        if isinstance(event, tuple):
            event_id, event_type = event
            await self.webhooks.send(self._engine, event_id, event_type, payment_id)
        return payment

    async def _payment_object(self, payment_id: str) -> dict[str, Any]:
        payment = await self.get_payment(payment_id)
        assert payment is not None
        return _export(payment)

    async def redeliver_webhooks(self) -> int:
        """The jobs' step: send again the payment events the inbox has not taken yet."""
        return await self.webhooks.redeliver_due(self._engine)
