"""Request and response bodies for accounts, checks, charges and the ledger (the guide's fields)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    field_validator,
    model_validator,
)

from ciris_billing.rates.schemas import Feature
from ciris_billing.request_body import RequestBody

OAuthProvider = Annotated[
    str,
    StringConstraints(pattern=r"^oauth:[a-z0-9][a-z0-9_.-]{0,57}$"),
    Field(description="Identity provider, e.g. `oauth:google`", examples=["oauth:google"]),
]
Currency = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z]{3}$", to_upper=True),
    Field(description="ISO 4217 code", examples=["USD"]),
]
# Free text that is stored: PostgreSQL text cannot hold NUL, so it is refused as input (422)
# rather than failing the insert (500).
NO_NUL = r"^[^\x00]*$"
MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=40)]
MetadataValue = (
    Annotated[str, StringConstraints(max_length=500)]
    | StrictInt
    | Annotated[float, Field(allow_inf_nan=False)]
    | bool
    | None
)
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=50)]

MAX_USES_PER_CHARGE = 1_000
MAX_QUANTITY = 1_000_000_000_000
MAX_MINOR = 100_000_000


def _check_external_id(value: str) -> str:
    if not value.strip():
        raise ValueError("external_id must not be blank")
    if "/" in value or not value.isprintable():
        raise ValueError("external_id must not contain '/' or control characters")
    return value


def _email_shape(value: str) -> str:
    if value.count("@") != 1 or not value.isprintable():
        raise ValueError("not an email address")
    return value


Email = Annotated[
    str,
    StringConstraints(max_length=320),
    AfterValidator(_email_shape),
    Field(examples=["user@example.com"]),
]


def _rated_fields(body: Any) -> Any:
    """A charge or hold gives `uses`, or `feature` and `quantity` (a rated one), not both."""
    if body.feature is not None and "uses" in body.model_fields_set:
        raise ValueError("give uses, or feature and quantity, not both")
    if (body.feature is None) != (body.quantity is None):
        raise ValueError("feature and quantity go together")
    return body


class IdentityFields(RequestBody):
    oauth_provider: OAuthProvider
    external_id: Annotated[
        str,
        StringConstraints(min_length=1, max_length=255),
        Field(description="The user's id at the provider", examples=["user@example.com"]),
    ]

    _external_id = field_validator("external_id")(_check_external_id)


class AccountCreate(IdentityFields):
    initial_balance_minor: StrictInt = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Paid uses to grant, only if the account is new; above zero needs an admin key",
    )
    currency: Currency | None = None
    plan_name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")] = "free"
    customer_email: Email | None = None
    display_name: Annotated[str, StringConstraints(max_length=255, pattern=NO_NUL)] | None = None


class AccountOut(BaseModel):
    account_id: str
    oauth_provider: str
    external_id: str
    customer_email: str | None
    display_name: str | None
    plan_name: str
    currency: str
    status: str
    balance_minor: int = Field(description="Paid uses left (same as credits_remaining)")
    credits_remaining: int
    free_uses_remaining: int
    total_uses: int
    held_uses: int = Field(description="Uses held by active reservations (not available)")
    created_at: str
    updated_at: str


class CreditCheck(IdentityFields):
    context: dict[str, Any] = Field(default_factory=dict)
    customer_email: Annotated[str, StringConstraints(max_length=320)] | None = None


class NextExpiryOut(BaseModel):
    uses: int = Field(description="Usable uses of the soonest-expiring lot(s)")
    expires_at: str = Field(description="When they stop counting (RFC 3339)")


class LotUseOut(BaseModel):
    lot_id: str
    uses: int = Field(description="Uses taken from this lot")


class CreditCheckOut(BaseModel):
    has_credit: bool
    credits_remaining: int
    plan_name: str
    reason: str | None
    free_uses_remaining: int
    total_uses: int
    held_uses: int = Field(description="Uses held by active reservations (not available)")
    purchase_required: bool
    purchase_price_minor: int | None = Field(
        default=None, description="Only when purchase_required"
    )
    purchase_uses: int | None = Field(default=None, description="Only when purchase_required")
    next_expiry: NextExpiryOut | None = Field(
        description="The soonest-expiring usable uses and when they expire; null when none expire"
    )
    portal_url: str = Field(
        description="The user's portal: balance, usage history, receipts, buy more "
        "(a signed link, valid for 7 days)"
    )


class ChargeCreate(IdentityFields):
    amount_minor: StrictInt = Field(default=0, ge=0, le=MAX_MINOR)
    currency: Currency | None = None
    description: Annotated[str, StringConstraints(max_length=500, pattern=NO_NUL)] | None = None
    metadata: Metadata = Field(default_factory=dict)
    uses: StrictInt = Field(default=1, ge=1, le=MAX_USES_PER_CHARGE)
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    # Rated usage (rates/service.py): instead of `uses`, a feature and its quantity.
    feature: Feature | None = None
    quantity: StrictInt | None = Field(
        default=None, ge=1, le=MAX_QUANTITY, description="Units of `feature` (not with `uses`)"
    )

    _rated = model_validator(mode="after")(lambda self: _rated_fields(self))


class ChargeOut(BaseModel):
    charge_id: str
    account_id: str
    oauth_provider: str
    external_id: str
    uses: int
    free_uses_used: int
    paid_uses_used: int
    amount_minor: int
    currency: str
    description: str | None
    metadata: dict[str, Any]
    free_uses_remaining: int
    credits_remaining: int
    balance_minor: int
    total_uses: int
    plan_name: str
    created_at: str
    lots: list[LotUseOut] = Field(description="The lots the charge drew from, in order")
    feature: str | None = Field(default=None, description="A rated charge's feature")
    quantity: int | None = Field(default=None, description="A rated charge's quantity")
    next_check: CreditCheckOut | None = Field(
        default=None,
        description="Asked with `Prefer: next-check`: what a credit check right after this "
        "charge answers, so an agent may skip that check (never on a replay)",
    )


class PurchaseRequiredOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    error: Literal["purchase_required"]
    detail: str
    purchase_required: bool
    purchase_price_minor: int
    purchase_uses: int
    currency: str
    free_uses_remaining: int
    credits_remaining: int = Field(description="Paid uses available")
    held_uses: int = Field(description="Uses held by active reservations (not available)")
    uses_requested: int
    checkout_url: str = Field(description="A page where the user can buy more (expires in 24 h)")
    portal_url: str = Field(description="The user's portal: balance, usage history, receipts")
    offers: list[dict[str, Any]] = Field(
        default_factory=list,
        description="The packs the account's plan may buy, in its currency (GET /v1/billing/packs"
        " fields); buy one with POST /v1/billing/purchases `pack_id`",
    )


class TransactionOut(BaseModel):
    transaction_id: str
    type: Literal["charge", "credit"]
    kind: str
    free_uses_delta: int
    paid_uses_delta: int
    amount_minor: int
    currency: str
    description: str | None
    external_transaction_id: str | None
    created_at: str


class TransactionsOut(BaseModel):
    account_id: str
    transactions: list[TransactionOut]
    total: int
    limit: int
    offset: int
    has_more: bool


Reason = Annotated[
    str, StringConstraints(min_length=1, max_length=500, strip_whitespace=True, pattern=NO_NUL)
]


# A grant's lot terms (issue 23): fields a negative adjustment may not carry.
LOT_TERMS = ("expires_at", "expires_in_days", "priority", "kind", "cost_basis_minor")


class GrantCreate(IdentityFields):
    uses: StrictInt = Field(
        ge=-1_000_000, le=1_000_000, description="Positive grants, negative removes"
    )
    reason: Reason
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=255)] | None = None
    # A positive grant is a lot with these terms (a negative adjustment takes none of them).
    expires_at: AwareDatetime | None = Field(
        default=None,
        description="When the granted uses stop counting (RFC 3339, in the future); "
        "not with expires_in_days. Default: never",
        examples=["2027-01-12T00:00:00Z"],
    )
    expires_in_days: StrictInt | None = Field(
        default=None, ge=1, le=36_600, description="Expires this many days from now"
    )
    priority: StrictInt | None = Field(
        default=None,
        ge=0,
        le=1_000_000,
        description="Consumption order: lower first (default 100, as every other lot)",
    )
    kind: Literal["promotional", "paid"] | None = Field(
        default=None,
        description="`promotional` (default) or `paid` (sold outside this service: give "
        "cost_basis_minor). Free uses are the installation's own, never granted",
    )
    cost_basis_minor: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_MINOR,
        description="What one use of a `paid` lot was paid, in minor units of the account's "
        "currency (the lot's amount is this times uses)",
    )

    @model_validator(mode="after")
    def _lot_terms(self) -> GrantCreate:
        given = [name for name in LOT_TERMS if getattr(self, name) is not None]
        if self.uses < 0 and given:
            raise ValueError(f"{', '.join(given)}: only a grant (uses > 0) makes a lot")
        if self.expires_at is not None and self.expires_in_days is not None:
            raise ValueError("give expires_at or expires_in_days, not both")
        if self.kind == "paid" and self.cost_basis_minor is None:
            raise ValueError("a paid lot needs cost_basis_minor")
        if self.kind != "paid" and self.cost_basis_minor is not None:
            raise ValueError("cost_basis_minor is for kind paid")
        return self


class LowBalanceThreshold(RequestBody):
    uses: StrictInt | None = Field(
        ge=0,
        le=1_000_000,
        description="balance.low fires below this many available uses (null: the default)",
    )


class StatusChange(RequestBody):
    reason: Reason | None = None


MAX_HOLD_SECONDS = 86_400


class ReservationCreate(IdentityFields):
    uses: StrictInt = Field(default=1, ge=1, le=MAX_USES_PER_CHARGE)
    ttl_seconds: StrictInt = Field(
        default=300, ge=1, le=MAX_HOLD_SECONDS, description="Released by itself after this"
    )
    metadata: Metadata = Field(default_factory=dict)
    # Rated (rates/service.py): instead of `uses`, a feature and quantity. An `up` rate holds
    # its rounded-up uses; a `carry` rate holds what the quantity can complete (the same) and
    # its capture applies the carry to the quantity used (ReservationCapture.quantity).
    feature: Feature | None = None
    quantity: StrictInt | None = Field(
        default=None, ge=1, le=MAX_QUANTITY, description="Units of `feature` (not with `uses`)"
    )

    _rated = model_validator(mode="after")(lambda self: _rated_fields(self))


class ReservationCapture(RequestBody):
    uses: StrictInt | None = Field(
        default=None, ge=1, le=MAX_USES_PER_CHARGE, description="At most the held uses; all"
    )
    # A hold by a feature with a `carry` rate: the units used (at most the held quantity;
    # default: all of it); the carry makes them uses. Not with `uses`.
    quantity: StrictInt | None = Field(
        default=None, ge=0, le=MAX_QUANTITY, description="A carry hold's units used (not uses)"
    )
    amount_minor: StrictInt = Field(default=0, ge=0, le=MAX_MINOR)
    description: Annotated[str, StringConstraints(max_length=500, pattern=NO_NUL)] | None = None
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _uses_or_quantity(self) -> ReservationCapture:
        if self.uses is not None and self.quantity is not None:
            raise ValueError("give uses, or quantity (a carry hold's), not both")
        return self


class ReservationOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    reservation_id: str
    account_id: str
    oauth_provider: str
    external_id: str
    status: Literal["held", "captured", "released", "expired"]
    uses: int
    captured_uses: int | None
    charge_id: str | None
    expires_at: str
    metadata: dict[str, Any]
    held_uses: int = Field(description="Uses held by the account's active reservations")
    free_uses_remaining: int = Field(description="Available free uses (not held)")
    credits_remaining: int = Field(description="Available paid uses (not held)")
    total_uses: int
    created_at: str


class ReservationCaptureOut(ChargeOut):
    reservation_id: str
    status: Literal["captured"]
    released_uses: int
    held_uses: int


class ReservationsOut(BaseModel):
    reservations: list[ReservationOut]
    limit: int
    offset: int


class LotVoid(RequestBody):
    reason: Reason | None = None


class LotOut(BaseModel):
    lot_id: str
    kind: Literal["free", "promotional", "paid"]
    uses_granted: int
    uses_remaining: int = Field(description="Usable now (held uses excluded); 0 once closed")
    priority: int
    expires_at: str | None
    source: str = Field(description="What granted it: free_grant, purchase, grant, auto_topup...")
    created_at: str
    status: Literal["active", "expired", "voided", "used", "erased"] = Field(
        description="`active`; `expired` (past expires_at: unusable, written off by the next "
        "job run); `voided`; `used`; `erased`"
    )
    cost_basis_minor: int | None = Field(description="Per use, paid lots only")
    closed_at: str | None


class LotsOut(BaseModel):
    lots: list[LotOut] = Field(
        description="Open lots first in consumption order, then (include=expired) closed ones"
    )


class LotVoidOut(BaseModel):
    lot_id: str
    account_id: str
    status: Literal["voided"]
    uses_voided: int = Field(description="What was left in the lot, now voided")
    reason: str | None
    held_open: bool = Field(
        description="True while open holds name the lot: their uses stay theirs (a release "
        "gives them back unusable, and the next job run voids them)"
    )
