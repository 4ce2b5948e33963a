"""The PaymentProvider protocol and the provider-neutral types it speaks.

Business code talks to payments only through this protocol; each provider module translates
its SDK's objects into these types, so nothing outside a provider module imports an SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

PaymentState = Literal[
    "pending", "requires_action", "processing", "succeeded", "failed", "canceled"
]
"""A payment in our words, whatever the provider calls it.

pending: waiting for the customer to pay (no attempt yet); requires_action: the customer must
authenticate (3-D Secure); processing: paid, not settled yet; succeeded: the money is ours;
failed: the last attempt was declined (the customer may try again with another card); canceled:
it will never be paid. Each provider maps its own statuses to these, inside its module.
"""

# A chargeback in our words: open (its uses are held), won (released) or lost (taken back).
DisputeState = Literal["open", "won", "lost"]


@dataclass(frozen=True, slots=True)
class PaymentIntent:
    """What we ask a provider to collect (the guide's `create_payment_intent(intent)`)."""

    amount_minor: int
    currency: str  # ISO 4217, upper case
    purchase_id: str
    account_id: str
    idempotency_key: str  # derived from the local purchase id: a retry never charges twice
    customer_email: str | None = None
    # The account's customer at the provider: a card the payer asks to keep (at confirmation,
    # `setup_future_usage`) is attached to it once the payment succeeds.
    customer_id: str | None = None
    # More for the payment's metadata (the catalog's pack_id, promotion_code), never personal.
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SavedCard:
    """A card the provider keeps for off-session payments (auto top-up).

    Only the provider's ids and what may be shown to its owner: never a card number.
    """

    payment_method_id: str
    customer_id: str
    brand: str | None = None
    last4: str | None = None


@dataclass(frozen=True, slots=True)
class OffSessionPayment:
    """A payment of a saved card while its owner is away (`confirm` and `off_session` at once)."""

    amount_minor: int
    currency: str  # ISO 4217, upper case
    purchase_id: str
    account_id: str
    customer_id: str
    payment_method_id: str
    # Derived from the account and the balance crossing that asked for it: a retry asks the
    # provider with the same key. (Our own idempotency does not rely on it: auto_topup.)
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """A payment as the provider sees it now."""

    payment_id: str
    state: PaymentState
    amount_minor: int
    currency: str  # upper case
    # The provider's own word for the state, shown to people (the checkout page) and never
    # used for a decision: business code reads `state`.
    provider_status: str
    client_secret: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    failure_message: str | None = None
    amount_refunded_minor: int = 0
    # The card that paid, as a receipt shows it (never its number); None until paid by card.
    card_brand: str | None = None
    card_last4: str | None = None
    # The card this payment saved for off-session use (the payer asked to keep it), once the
    # provider has attached it to the customer; None otherwise.
    saved_card: SavedCard | None = None


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    """Something happened to a payment (paid, declined, needs action, canceled): fetch it."""

    payment_id: str | None  # None: the event names no payment


@dataclass(frozen=True, slots=True)
class RefundEvent:
    """Money went back on a payment (from our API or the provider's dashboard): fetch it."""

    payment_id: str | None  # None: the event names no payment


@dataclass(frozen=True, slots=True)
class DisputeEvent:
    """A chargeback was opened, changed or closed: ask the provider (`get_dispute`).

    It carries only what names the dispute: its state and amount are whatever the provider
    says, never what an event body claims (a dispute the provider does not know is ignored).
    """

    dispute_id: str | None  # None: the event names no dispute we could look up
    payment_id: str | None = None  # when the event names the payment itself
    charge_id: str | None = None  # when it names a charge of the payment (payment_for_charge)


EventSubject = PaymentEvent | RefundEvent | DisputeEvent


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """A provider event, parsed by its provider into our types.

    `type` is the provider's own name for the event: stored and logged, never branched on.
    `subject` is what it means to us; None for an event we do not act on.
    """

    event_id: str
    type: str
    payment_id: str | None  # the payment the event names, if any: stored for operators
    created: int
    payload: dict[str, Any]
    subject: EventSubject | None = None


@dataclass(frozen=True, slots=True)
class Dispute:
    """A chargeback as the provider sees it now, with the payment it disputes."""

    dispute_id: str
    payment_id: str | None
    state: DisputeState
    amount_minor: int


# Metadata keys we put on every payment, so an event can be traced back to its purchase.
PURCHASE_ID_KEY = "ciris_purchase_id"
ACCOUNT_ID_KEY = "ciris_account_id"


class PaymentProvider(Protocol):
    name: str
    publishable_key: str | None

    async def create_payment_intent(self, intent: PaymentIntent) -> PaymentResult: ...

    async def confirm_payment(self, payment_id: str) -> bool:
        """True when the payment has succeeded at the provider."""
        ...

    async def get_payment(self, payment_id: str) -> PaymentResult | None:
        """The payment's current state, or None when the provider does not know it."""
        ...

    async def verify_webhook(self, payload: bytes, signature: str) -> WebhookEvent:
        """Check the signature on the raw body (raise InvalidWebhookSignature), then parse."""
        ...

    def parse_event(self, payload: bytes) -> WebhookEvent:
        """A body whose signature was already verified (a stored event) → WebhookEvent.

        Raises InvalidWebhookSignature when it is not an event of this provider."""
        ...

    async def refund_payment(
        self, payment_id: str, amount_minor: int | None, idempotency_key: str | None = None
    ) -> str:
        """Refund all (None) or part of a payment; returns the provider's refund id."""
        ...

    async def get_dispute(self, dispute_id: str) -> Dispute | None:
        """The dispute's current state, or None when the provider does not know it."""
        ...

    async def payment_for_charge(self, charge_id: str) -> str | None:
        """The payment a charge belongs to (disputes name a charge), or None if unknown."""
        ...

    # Saved cards and off-session payments (auto top-up).

    async def create_customer(self, account_id: str, idempotency_key: str) -> str:
        """A customer at the provider for one of our accounts; returns its id."""
        ...

    async def pay_off_session(self, payment: OffSessionPayment) -> PaymentResult:
        """Charge a saved card now. A decline or a bank asking for authentication is the
        result's state (`failed`, `requires_action`), not an error; errors are the provider's
        own (unreachable, refused)."""
        ...

    async def find_payment(self, customer_id: str, purchase_id: str) -> PaymentResult | None:
        """The customer's payment made for our purchase `purchase_id`, if the provider has one
        (after a call whose answer was lost: our idempotency never relies on the provider's)."""
        ...

    async def detach_card(self, payment_method_id: str) -> None:
        """Forget a saved card (it can never be charged again); an unknown one is no error."""
        ...

    async def aclose(self) -> None: ...
