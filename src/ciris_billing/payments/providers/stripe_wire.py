"""Stripe's wire format (event JSON, PaymentIntent and dispute statuses) → our neutral types.

Pure parsing, no SDK: the Stripe provider uses it, and so does the sandbox, whose events and
payment statuses imitate Stripe test mode on purpose. Nothing outside the providers reads a
Stripe event name or status.
"""

from __future__ import annotations

import json
from typing import Any, Final

from ciris_billing.errors import InvalidWebhookSignature
from ciris_billing.payments.providers.base import (
    DisputeEvent,
    DisputeState,
    EventSubject,
    PaymentEvent,
    PaymentState,
    RefundEvent,
    WebhookEvent,
)

# Events that say something about a payment: each makes the inbox fetch the payment.
PAYMENT_EVENTS: Final = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
        "payment_intent.processing",
        "payment_intent.requires_action",
    }
)
# Refunds, from our API or the dashboard: the payment's refunded total is fetched.
REFUND_EVENTS: Final = frozenset(
    {"charge.refunded", "charge.refund.updated", "refund.created", "refund.updated"}
)
DISPUTE_EVENTS: Final = frozenset(
    {
        "charge.dispute.created",
        "charge.dispute.updated",
        "charge.dispute.closed",
        "charge.dispute.funds_withdrawn",
        "charge.dispute.funds_reinstated",
    }
)

_STATES: Final[dict[str, PaymentState]] = {
    "requires_payment_method": "pending",
    "requires_confirmation": "pending",
    "requires_action": "requires_action",
    "processing": "processing",
    # We never ask for manual capture; an authorised, uncaptured payment is not money yet.
    "requires_capture": "processing",
    "succeeded": "succeeded",
    "canceled": "canceled",
}


# The decline code of an off-session payment whose bank wants the customer to authenticate.
AUTHENTICATION_REQUIRED: Final = "authentication_required"
# PaymentIntent parameters of saved cards (auto top-up).
OFF_SESSION: Final = "off_session"


def payment_state(status: str, declined: bool, error_code: str | None = None) -> PaymentState:
    """A PaymentIntent status in our words. `declined`: it carries a last_payment_error.

    Stripe puts a declined intent back to requires_payment_method (the customer may try
    another card); with the error attached, that is our `failed` - unless the error says the
    bank wants authentication (an off-session payment of a saved card): the customer must act,
    which is our `requires_action`. A status this code does not know (a newer API version) is
    in flight: never credited, looked at again later.
    """
    if status == "requires_payment_method" and declined:
        return "requires_action" if error_code == AUTHENTICATION_REQUIRED else "failed"
    return _STATES.get(status, "processing")


def dispute_state(status: str) -> DisputeState:
    """A dispute status in our words (`warning_closed`: an inquiry closed without a chargeback)."""
    if status in ("won", "warning_closed"):
        return "won"
    return "lost" if status == "lost" else "open"


def _payment_id_of(data_object: dict[str, Any]) -> str | None:
    """The PaymentIntent an event's object is, or belongs to (charges, refunds)."""
    if data_object.get("object") == "payment_intent":
        value = data_object.get("id")
    else:
        value = data_object.get("payment_intent")
    if isinstance(value, dict):  # an expanded PaymentIntent
        value = value.get("id")
    return value if isinstance(value, str) and value else None


def _dispute_event(data_object: dict[str, Any]) -> DisputeEvent:
    dispute_id = data_object.get("id")
    charge = data_object.get("charge")
    if isinstance(charge, dict):  # an expanded Charge
        charge = charge.get("id")
    # Only what names the dispute: its status and amount in the body are never read.
    return DisputeEvent(
        dispute_id=dispute_id if isinstance(dispute_id, str) and dispute_id else None,
        payment_id=_payment_id_of(data_object),
        charge_id=charge if isinstance(charge, str) and charge else None,
    )


def _subject(event_type: str, data_object: Any) -> EventSubject | None:
    if not isinstance(data_object, dict):
        data_object = {}
    if event_type in PAYMENT_EVENTS:
        return PaymentEvent(_payment_id_of(data_object))
    if event_type in REFUND_EVENTS:
        return RefundEvent(_payment_id_of(data_object))
    if event_type in DISPUTE_EVENTS:
        return _dispute_event(data_object)
    return None


def parse_event(payload: bytes) -> WebhookEvent:
    """A Stripe-shaped event body (its signature already checked) → WebhookEvent."""
    try:
        event = json.loads(payload)
        data_object = event["data"]["object"]
        if not isinstance(data_object, dict):
            raise TypeError("data.object is not an object")
        event_id, event_type, created = str(event["id"]), str(event["type"]), int(event["created"])
    except (ValueError, KeyError, TypeError, OverflowError):  # int(Infinity)
        raise InvalidWebhookSignature("The signed webhook body is not a valid event") from None
    subject = _subject(event_type, data_object)
    return WebhookEvent(event_id, event_type, _payment_id_of(data_object), created, event, subject)
