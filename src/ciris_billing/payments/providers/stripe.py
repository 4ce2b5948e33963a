"""The Stripe provider: PaymentIntents through the official SDK's async client.

The only module that imports `stripe`. It translates the SDK's objects and errors into the
provider-neutral types of `base`, and never lets a secret (API key, webhook secret, client
secret) into an error message.

Errors: Stripe unreachable (connection refused, timeout, ...) is ProviderUnavailable (503,
retry later); any other Stripe error is ProviderError (502) naming only Stripe's HTTP status
and error code. Unknown payments are `None` from get_payment, not errors.
"""

from __future__ import annotations

import uuid
from typing import Any, Final

import stripe

from ciris_billing.errors import InvalidWebhookSignature, ProviderError, ProviderUnavailable
from ciris_billing.payments.providers import stripe_wire
from ciris_billing.payments.providers.base import (
    ACCOUNT_ID_KEY,
    PURCHASE_ID_KEY,
    Dispute,
    OffSessionPayment,
    PaymentIntent,
    PaymentResult,
    SavedCard,
    WebhookEvent,
)
from ciris_billing.payments.providers.signing import DEFAULT_TOLERANCE_SECONDS

DEFAULT_MAX_NETWORK_RETRIES: Final = 2
DEFAULT_TIMEOUT_SECONDS: Final = 30.0


def _provider_error(exc: stripe.StripeError, action: str) -> ProviderError | ProviderUnavailable:
    """A neutral error for a failed SDK call; the SDK's own message is never copied."""
    if isinstance(exc, stripe.APIConnectionError):
        return ProviderUnavailable(f"Stripe could not be reached to {action}; try again later")
    details = []
    if exc.http_status is not None:
        details.append(f"http_status={exc.http_status}")
    if exc.code:
        details.append(f"code={exc.code}")
    suffix = f" ({', '.join(details)})" if details else ""
    return ProviderError(f"Stripe refused to {action}{suffix}")


def _is_missing(exc: stripe.StripeError) -> bool:
    # Any 404: Stripe says resource_missing; a Stripe-compatible server without the resource
    # type at all (localstripe has no disputes) answers a bare 404.
    return exc.http_status == 404 or exc.code == "resource_missing"


def _amount_refunded(intent: stripe.PaymentIntent) -> int:
    """From the latest charge when it came expanded (retrieve asks for it); else 0."""
    charge = intent.latest_charge
    if isinstance(charge, stripe.Charge):
        return int(charge.amount_refunded or 0)
    return 0


def _card(intent: stripe.PaymentIntent) -> tuple[str | None, str | None]:
    """(brand, last 4) of the card that paid, from the expanded latest charge; else Nones."""
    charge = intent.latest_charge
    details = getattr(charge, "payment_method_details", None) if charge is not None else None
    card = getattr(details, "card", None) if details is not None else None
    if card is None:
        return None, None
    brand, last4 = getattr(card, "brand", None), getattr(card, "last4", None)
    return (
        brand if isinstance(brand, str) else None,
        last4 if isinstance(last4, str) else None,
    )


def _id_of(value: Any) -> str | None:
    """An expandable field's id, whether it came as an id or as the expanded object."""
    if isinstance(value, str):
        return value
    found = getattr(value, "id", None)
    return found if isinstance(found, str) else None


def _saved_card(intent: stripe.PaymentIntent) -> SavedCard | None:
    """The card the payment kept for off-session use: asked for (setup_future_usage), and
    attached by Stripe to the payment's customer (which it does once the payment succeeded).
    Needs the payment method expanded (get_payment asks for it). Brand and last4 only."""
    method = intent.payment_method
    customer = _id_of(intent.customer)
    if (
        getattr(intent, "setup_future_usage", None) != stripe_wire.OFF_SESSION
        or customer is None
        or not isinstance(method, stripe.PaymentMethod)
        or _id_of(method.customer) != customer
    ):
        return None
    card = getattr(method, "card", None)
    return SavedCard(
        payment_method_id=method.id,
        customer_id=customer,
        brand=getattr(card, "brand", None),
        last4=getattr(card, "last4", None),
    )


def _result(intent: stripe.PaymentIntent) -> PaymentResult:
    error = intent.last_payment_error
    metadata = intent.metadata.to_dict() if intent.metadata is not None else {}
    code = getattr(error, "code", None) if error is not None else None
    return PaymentResult(
        payment_id=intent.id,
        state=stripe_wire.payment_state(intent.status, declined=error is not None, error_code=code),
        amount_minor=intent.amount,
        currency=intent.currency.upper(),
        provider_status=intent.status,
        client_secret=intent.client_secret,
        metadata={str(key): str(value) for key, value in metadata.items()},
        failure_message=error.message if error is not None else None,
        amount_refunded_minor=_amount_refunded(intent),
        card_brand=_card(intent)[0],
        card_last4=_card(intent)[1],
        saved_card=_saved_card(intent),
    )


class StripeProvider:
    name = "stripe"

    def __init__(
        self,
        api_key: str,
        webhook_secret: str,
        publishable_key: str | None,
        api_base: str | None = None,
        *,
        max_network_retries: int = DEFAULT_MAX_NETWORK_RETRIES,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        if not webhook_secret:
            raise ValueError("StripeProvider needs a webhook secret")
        self.publishable_key = publishable_key
        self._webhook_secret = webhook_secret
        self._http = stripe.HTTPXClient(timeout=timeout_seconds)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            http_client=self._http,
            max_network_retries=max_network_retries,
        )

    def __repr__(self) -> str:  # never show the keys
        return f"StripeProvider(publishable_key={self.publishable_key!r})"

    async def create_payment_intent(self, intent: PaymentIntent) -> PaymentResult:
        params: stripe.params.PaymentIntentCreateParams = {
            "amount": intent.amount_minor,
            "currency": intent.currency.lower(),
            # No payment-method-type parameter. At the SDK's pinned API version
            # (2026-10-28.endive) Stripe rejects `payment_method_types` (400
            # payment_method_types_no_longer_supported), and localstripe rejects its
            # replacement `allowed_payment_method_types`. Without either, Stripe offers
            # the account's dynamic payment methods (cards included), localstripe any card.
            "metadata": {
                **intent.metadata,
                PURCHASE_ID_KEY: intent.purchase_id,
                ACCOUNT_ID_KEY: intent.account_id,
            },
        }
        if intent.customer_id:
            # Whose card it keeps if the payer asks to (setup_future_usage, sent by Stripe.js
            # with the confirmation: never set here, so no one but the payer can ask for it).
            params["customer"] = intent.customer_id
        if intent.customer_email:
            # Where Stripe sends the email receipt once the payment succeeds (the guide's
            # checklist: email receipts); Stripe itself keeps it, we never log it.
            params["receipt_email"] = intent.customer_email
        try:
            created = await self._client.v1.payment_intents.create_async(
                params=params, options={"idempotency_key": intent.idempotency_key}
            )
        except stripe.StripeError as exc:
            raise _provider_error(exc, "create the payment") from None
        return _result(created)

    async def get_payment(self, payment_id: str) -> PaymentResult | None:
        try:
            found = await self._client.v1.payment_intents.retrieve_async(
                payment_id, params={"expand": ["latest_charge", "payment_method"]}
            )
        except stripe.StripeError as exc:
            if _is_missing(exc):
                return None
            raise _provider_error(exc, "look up the payment") from None
        return _result(found)

    async def confirm_payment(self, payment_id: str) -> bool:
        payment = await self.get_payment(payment_id)
        return payment is not None and payment.state == "succeeded"

    async def verify_webhook(self, payload: bytes, signature: str) -> WebhookEvent:
        try:
            stripe.WebhookSignature.verify_header(
                payload, signature, self._webhook_secret, DEFAULT_TOLERANCE_SECONDS
            )
        except Exception:
            # The SDK's message may quote the header or payload: say only what is wrong.
            raise InvalidWebhookSignature(
                "Missing, malformed, stale or wrong Stripe-Signature"
            ) from None
        return self.parse_event(payload)

    def parse_event(self, payload: bytes) -> WebhookEvent:
        return stripe_wire.parse_event(payload)

    async def refund_payment(
        self, payment_id: str, amount_minor: int | None, idempotency_key: str | None = None
    ) -> str:
        params: stripe.params.RefundCreateParams = {"payment_intent": payment_id}
        if amount_minor is not None:
            params["amount"] = amount_minor
        # A caller's key makes its retries one refund; without one, each call is a new refund
        # (two partial refunds of the same amount are legitimate and must not be merged).
        key = idempotency_key or f"refund-{payment_id}-{uuid.uuid4().hex}"
        try:
            refund = await self._client.v1.refunds.create_async(
                params=params, options={"idempotency_key": key}
            )
        except stripe.StripeError as exc:
            raise _provider_error(exc, "refund the payment") from None
        return refund.id

    async def get_dispute(self, dispute_id: str) -> Dispute | None:
        try:
            found = await self._client.v1.disputes.retrieve_async(dispute_id)
        except stripe.StripeError as exc:
            if _is_missing(exc):
                return None
            raise _provider_error(exc, "look up the dispute") from None
        payment_id = _id_of(getattr(found, "payment_intent", None))
        if payment_id is None:
            payment_id = await self.payment_for_charge(_id_of(found.charge) or "")
        return Dispute(
            dispute_id=found.id,
            payment_id=payment_id,
            state=stripe_wire.dispute_state(str(found.status)),
            amount_minor=int(found.amount or 0),
        )

    async def payment_for_charge(self, charge_id: str) -> str | None:
        if not charge_id:
            return None
        try:
            charge = await self._client.v1.charges.retrieve_async(charge_id)
        except stripe.StripeError as exc:
            if _is_missing(exc):
                return None
            raise _provider_error(exc, "look up the charge") from None
        return _id_of(charge.payment_intent)

    # Saved cards and off-session payments (auto top-up).

    async def create_customer(self, account_id: str, idempotency_key: str) -> str:
        params: stripe.params.CustomerCreateParams = {"metadata": {ACCOUNT_ID_KEY: account_id}}
        try:
            customer = await self._client.v1.customers.create_async(
                params=params, options={"idempotency_key": idempotency_key}
            )
        except stripe.StripeError as exc:
            raise _provider_error(exc, "create the customer") from None
        return customer.id

    async def pay_off_session(self, payment: OffSessionPayment) -> PaymentResult:
        params: stripe.params.PaymentIntentCreateParams = {
            "amount": payment.amount_minor,
            "currency": payment.currency.lower(),
            "customer": payment.customer_id,
            "payment_method": payment.payment_method_id,
            "confirm": True,
            "off_session": True,
            "metadata": {
                PURCHASE_ID_KEY: payment.purchase_id,
                ACCOUNT_ID_KEY: payment.account_id,
            },
        }
        try:
            created = await self._client.v1.payment_intents.create_async(
                params=params, options={"idempotency_key": payment.idempotency_key}
            )
        except stripe.CardError as exc:
            # Declined, or the bank wants authentication: Stripe answers 402 but the payment
            # exists (the error names it, or at least its charge); its state says the rest.
            declined = await self._declined_payment(exc)
            if declined is None:
                raise _provider_error(exc, "charge the saved card") from None
            return declined
        except stripe.StripeError as exc:
            raise _provider_error(exc, "charge the saved card") from None
        return _result(created)

    async def _declined_payment(self, exc: stripe.CardError) -> PaymentResult | None:
        error = exc.error
        payment_id = _id_of(getattr(error, "payment_intent", None)) if error else None
        if payment_id is None and error is not None and getattr(error, "charge", None):
            # (localstripe names only the charge.)
            payment_id = await self.payment_for_charge(str(error.charge))
        return None if payment_id is None else await self.get_payment(payment_id)

    async def find_payment(self, customer_id: str, purchase_id: str) -> PaymentResult | None:
        try:
            page = await self._client.v1.payment_intents.list_async(
                params={"customer": customer_id, "limit": 100}
            )
        except stripe.StripeError as exc:
            raise _provider_error(exc, "look up the customer's payments") from None
        for intent in page.data:
            metadata = intent.metadata.to_dict() if intent.metadata is not None else {}
            if metadata.get(PURCHASE_ID_KEY) == purchase_id:
                return await self.get_payment(intent.id)
        return None

    async def detach_card(self, payment_method_id: str) -> None:
        try:
            await self._client.v1.payment_methods.detach_async(payment_method_id)
        except stripe.StripeError as exc:
            if _is_missing(exc):
                return
            raise _provider_error(exc, "remove the saved card") from None

    async def aclose(self) -> None:
        """Close the HTTPX connection pool (the SDK's own, public close; it is unannotated)."""
        await self._http.close_async()  # type: ignore[no-untyped-call]
