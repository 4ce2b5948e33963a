"""Request and response bodies of the webhook endpoint API."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints

from ciris_billing.accounts.schemas import NO_NUL
from ciris_billing.request_body import RequestBody

EventType = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class WebhookEndpointCreate(RequestBody):
    url: Annotated[str, StringConstraints(min_length=1, max_length=2048)] = Field(
        description="https URL on a public address (http and private addresses only with "
        "ALLOW_PRIVATE_WEBHOOK_URLS=true)",
        examples=["https://app.example.com/billing-events"],
    )
    events: list[EventType] | None = Field(
        default=None,
        max_length=32,
        description="Event types to receive (leave out: all)",
        examples=[["balance.low", "purchase.succeeded"]],
    )
    description: Annotated[str, StringConstraints(max_length=500, pattern=NO_NUL)] | None = None


class WebhookEndpointOut(BaseModel):
    id: str
    url: str
    events: list[str] | None
    description: str | None
    status: Literal["enabled", "disabled"]
    disabled_reason: str | None
    failing_since: str | None
    previous_secret_expires_at: str | None = Field(
        description="Until then the secret before the last rotation still signs beside the new"
    )
    created_at: str


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str = Field(description="whsec_ + base64: shown only now; verifies the signatures")


class WebhookEndpointsOut(BaseModel):
    data: list[WebhookEndpointOut]


class WebhookDeliveryOut(BaseModel):
    id: str
    endpoint_id: str
    event_id: str = Field(description="Also the webhook-id header of every attempt")
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    next_attempt_at: str | None
    last_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: str | None
    created_at: str


class WebhookDeliveriesOut(BaseModel):
    data: list[WebhookDeliveryOut]
    limit: int
    offset: int


class EndpointDeleted(BaseModel):
    id: str
    deleted: bool
