"""Typed, frozen results of the billing API, parsed leniently: unknown JSON fields are ignored
(kept in `raw`), so a newer server never breaks an older client."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ciris_billing_client.errors import BillingError, Offer


@dataclass(frozen=True, slots=True)
class NextExpiry:
    """The usable uses of the account's soonest-expiring lot(s), and when they expire."""

    uses: int
    expires_at: str


@dataclass(frozen=True, slots=True)
class LotUse:
    """A lot a charge drew from, and how many uses it took there."""

    lot_id: str
    uses: int


@dataclass(frozen=True, slots=True)
class CreditCheck:
    """May this user go on? Counts are None only when `degraded` (billing was unreachable and
    the client failed open: `has_credit` is then True without the server having said so)."""

    has_credit: bool
    purchase_required: bool
    credits_remaining: int | None
    free_uses_remaining: int | None
    total_uses: int | None
    plan_name: str | None
    reason: str | None
    purchase_price_minor: int | None = None
    purchase_uses: int | None = None
    held_uses: int | None = None  # uses the account's active holds keep aside (not counted above)
    # The soonest-expiring usable uses (None: nothing expires, or an older server).
    next_expiry: NextExpiry | None = None
    # The user's portal (balance, usage history, receipts, buy more): a signed link to show
    # them; kept out of repr() (whoever holds it sees the account).
    portal_url: str | None = field(default=None, repr=False)
    degraded: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Charge:
    """A recorded use. When `pending` (billing was unreachable and the client failed open) the
    charge waits in the client's outbox: the server's fields (`charge_id`, counts, ...) are None
    until it is flushed under the same `idempotency_key`."""

    oauth_provider: str
    external_id: str
    uses: int
    amount_minor: int
    currency: str | None
    description: str | None
    metadata: Mapping[str, Any]
    idempotency_key: str
    charge_id: str | None = None
    account_id: str | None = None
    free_uses_used: int | None = None
    paid_uses_used: int | None = None
    free_uses_remaining: int | None = None
    credits_remaining: int | None = None
    balance_minor: int | None = None
    total_uses: int | None = None
    plan_name: str | None = None
    created_at: str | None = None
    pending: bool = False
    replayed: bool = False
    # Set when the charge is a hold's capture: the hold, and the held uses given back.
    reservation_id: str | None = None
    released_uses: int | None = None
    held_uses: int | None = None
    # The lots it drew from, in order (empty while pending, or from an older server).
    lots: tuple[LotUse, ...] = ()
    # A rated charge (charged by `feature` and `quantity`; `uses` what the rate made of it,
    # 0 while pending).
    feature: str | None = None
    quantity: int | None = None
    # What the user's next credit check answers, right after this charge (the client asks for
    # it; None from a replay or an older server). The client answers that check from it.
    next_check: CreditCheck | None = field(default=None, repr=False, compare=False)
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on `uses` uses until `expires_at` (ISO 8601, UTC): `status` is held, captured,
    released or expired. The counts are the account's *available* uses (held ones excluded)
    when the service answered; `held_uses` is what all its active holds keep aside."""

    reservation_id: str
    account_id: str
    oauth_provider: str
    external_id: str
    status: str
    uses: int
    captured_uses: int | None
    charge_id: str | None
    expires_at: str
    metadata: Mapping[str, Any]
    held_uses: int
    free_uses_remaining: int
    credits_remaining: int
    total_uses: int
    created_at: str
    idempotency_key: str | None = None
    replayed: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class ReservationPage:
    """A page of reservations, newest first."""

    reservations: tuple[Reservation, ...]
    limit: int
    offset: int
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class PendingCharge:
    """A charge accepted while billing was unreachable, waiting in the in-memory outbox."""

    oauth_provider: str
    external_id: str
    uses: int
    amount_minor: int
    currency: str | None
    description: str | None
    metadata: Mapping[str, Any]
    idempotency_key: str
    queued_at: float  # time.time() when queued
    feature: str | None = None  # a rated charge: sent instead of `uses`
    quantity: int | None = None

    def as_charge(self) -> Charge:
        return Charge(
            oauth_provider=self.oauth_provider,
            external_id=self.external_id,
            uses=0 if self.feature is not None else self.uses,
            feature=self.feature,
            quantity=self.quantity,
            amount_minor=self.amount_minor,
            currency=self.currency,
            description=self.description,
            metadata=self.metadata,
            idempotency_key=self.idempotency_key,
            pending=True,
        )


@dataclass(frozen=True, slots=True)
class DroppedCharge:
    """A pending charge the server refused for good when flushed (e.g. 402: no use left)."""

    charge: PendingCharge
    error: BillingError


@dataclass(frozen=True, slots=True)
class FlushReport:
    """What `flush_pending()` did: charges now recorded, charges refused for good, and how many
    are still pending (billing still unreachable, or being flushed by another call)."""

    recorded: tuple[Charge, ...] = ()
    dropped: tuple[DroppedCharge, ...] = ()
    remaining: int = 0
    error: BillingError | None = None


@dataclass(frozen=True, slots=True)
class Purchase:
    """A purchase of uses. `client_secret` only on creation; `checkout_url` and
    `publishable_key` only when the server offers them."""

    purchase_id: str
    payment_id: str
    amount_minor: int
    currency: str
    uses_purchased: int
    status: str
    provider: str
    # Both carry the intent's client secret: kept out of repr() (and so out of logs).
    client_secret: str | None = field(default=None, repr=False)
    publishable_key: str | None = None
    checkout_url: str | None = field(default=None, repr=False)
    portal_url: str | None = field(default=None, repr=False)  # on creation
    account_id: str | None = None
    credited: bool | None = None
    failure_message: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    idempotency_key: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


@dataclass(frozen=True, slots=True)
class Transaction:
    """One ledger row: a charge (negative deltas) or a credit (grant, purchase, ...)."""

    transaction_id: str
    type: str
    kind: str
    free_uses_delta: int
    paid_uses_delta: int
    amount_minor: int
    currency: str
    description: str | None
    external_transaction_id: str | None
    created_at: str
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class TransactionPage:
    """A page of an account's ledger, newest first."""

    account_id: str
    transactions: tuple[Transaction, ...]
    total: int
    limit: int
    offset: int
    has_more: bool
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class Lot:
    """One grant of uses (free, promotional or paid): what is left, when it expires."""

    lot_id: str
    kind: str
    uses_granted: int
    uses_remaining: int
    priority: int
    expires_at: str | None
    source: str
    created_at: str
    status: str
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


class _Fields:
    """Typed reads from a JSON object; a missing or mistyped field is an `invalid_response`."""

    def __init__(self, data: object, what: str) -> None:
        if not isinstance(data, dict):
            raise _invalid(what, "is not a JSON object")
        self.data: dict[str, Any] = data
        self.what = what

    def _get(self, name: str, kinds: tuple[type, ...], optional: bool) -> Any:
        value = self.data.get(name)
        if value is None and optional:
            return None
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise _invalid(self.what, f"field {name!r} is {value!r}")
        return value

    def integer(self, name: str) -> int:
        value: int = self._get(name, (int,), optional=False)
        return value

    def opt_integer(self, name: str) -> int | None:
        value: int | None = self._get(name, (int,), optional=True)
        return value

    def text(self, name: str) -> str:
        value: str = self._get(name, (str,), optional=False)
        return value

    def opt_text(self, name: str) -> str | None:
        value: str | None = self._get(name, (str,), optional=True)
        return value

    def flag(self, name: str) -> bool:
        value: bool = self._get(name, (bool,), optional=False)
        return value

    def opt_flag(self, name: str) -> bool | None:
        value: bool | None = self._get(name, (bool,), optional=True)
        return value

    def mapping(self, name: str) -> dict[str, Any]:
        value: dict[str, Any] | None = self._get(name, (dict,), optional=True)
        return value or {}

    def array(self, name: str) -> list[Any]:
        value: list[Any] = self._get(name, (list,), optional=False)
        return value


def _invalid(what: str, problem: str) -> BillingError:
    return BillingError(
        f"Unexpected {what} from the billing service: {problem}", code="invalid_response"
    )


def parse_check(data: object) -> CreditCheck:
    f = _Fields(data, "credit check")
    return CreditCheck(
        has_credit=f.flag("has_credit"),
        purchase_required=f.flag("purchase_required"),
        credits_remaining=f.integer("credits_remaining"),
        free_uses_remaining=f.integer("free_uses_remaining"),
        total_uses=f.integer("total_uses"),
        plan_name=f.text("plan_name"),
        reason=f.opt_text("reason"),
        purchase_price_minor=f.opt_integer("purchase_price_minor"),
        purchase_uses=f.opt_integer("purchase_uses"),
        held_uses=f.opt_integer("held_uses"),
        next_expiry=_next_expiry(f.data.get("next_expiry")),
        portal_url=f.opt_text("portal_url"),
        raw=f.data,
    )


def _next_expiry(data: object) -> NextExpiry | None:
    if data is None:
        return None
    f = _Fields(data, "next expiry")
    return NextExpiry(uses=f.integer("uses"), expires_at=f.text("expires_at"))


def _lots(data: object) -> tuple[LotUse, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        raise _invalid("charge", f"field 'lots' is {data!r}")
    return tuple(
        LotUse(lot_id=f.text("lot_id"), uses=f.integer("uses"))
        for f in (_Fields(item, "charge's lot") for item in data)
    )


def degraded_check() -> CreditCheck:
    return CreditCheck(
        has_credit=True,
        purchase_required=False,
        credits_remaining=None,
        free_uses_remaining=None,
        total_uses=None,
        plan_name=None,
        reason="billing_unreachable",
        degraded=True,
    )


def parse_charge(data: object, idempotency_key: str, replayed: bool) -> Charge:
    f = _Fields(data, "charge")
    return Charge(
        oauth_provider=f.text("oauth_provider"),
        external_id=f.text("external_id"),
        uses=f.integer("uses"),
        amount_minor=f.integer("amount_minor"),
        currency=f.text("currency"),
        description=f.opt_text("description"),
        metadata=f.mapping("metadata"),
        idempotency_key=idempotency_key,
        charge_id=f.text("charge_id"),
        account_id=f.text("account_id"),
        free_uses_used=f.integer("free_uses_used"),
        paid_uses_used=f.integer("paid_uses_used"),
        free_uses_remaining=f.integer("free_uses_remaining"),
        credits_remaining=f.integer("credits_remaining"),
        balance_minor=f.integer("balance_minor"),
        total_uses=f.integer("total_uses"),
        plan_name=f.text("plan_name"),
        created_at=f.text("created_at"),
        replayed=replayed,
        reservation_id=f.opt_text("reservation_id"),
        released_uses=f.opt_integer("released_uses"),
        held_uses=f.opt_integer("held_uses"),
        lots=_lots(f.data.get("lots")),
        feature=f.opt_text("feature"),
        quantity=f.opt_integer("quantity"),
        next_check=None if f.data.get("next_check") is None else parse_check(f.data["next_check"]),
        raw=f.data,
    )


def parse_reservation(
    data: object, idempotency_key: str | None = None, replayed: bool = False
) -> Reservation:
    f = _Fields(data, "reservation")
    return Reservation(
        reservation_id=f.text("reservation_id"),
        account_id=f.text("account_id"),
        oauth_provider=f.text("oauth_provider"),
        external_id=f.text("external_id"),
        status=f.text("status"),
        uses=f.integer("uses"),
        captured_uses=f.opt_integer("captured_uses"),
        charge_id=f.opt_text("charge_id"),
        expires_at=f.text("expires_at"),
        metadata=f.mapping("metadata"),
        held_uses=f.integer("held_uses"),
        free_uses_remaining=f.integer("free_uses_remaining"),
        credits_remaining=f.integer("credits_remaining"),
        total_uses=f.integer("total_uses"),
        created_at=f.text("created_at"),
        idempotency_key=idempotency_key,
        replayed=replayed,
        raw=f.data,
    )


def parse_reservations(data: object) -> ReservationPage:
    f = _Fields(data, "reservation page")
    return ReservationPage(
        reservations=tuple(parse_reservation(item) for item in f.array("reservations")),
        limit=f.integer("limit"),
        offset=f.integer("offset"),
        raw=f.data,
    )


def parse_purchase(data: object, idempotency_key: str | None = None) -> Purchase:
    f = _Fields(data, "purchase")
    return Purchase(
        purchase_id=f.text("purchase_id"),
        payment_id=f.text("payment_id"),
        amount_minor=f.integer("amount_minor"),
        currency=f.text("currency"),
        uses_purchased=f.integer("uses_purchased"),
        status=f.text("status"),
        provider=f.text("provider"),
        client_secret=f.opt_text("client_secret"),
        publishable_key=f.opt_text("publishable_key"),
        checkout_url=f.opt_text("checkout_url"),
        portal_url=f.opt_text("portal_url"),
        account_id=f.opt_text("account_id"),
        credited=f.opt_flag("credited"),
        failure_message=f.opt_text("failure_message"),
        created_at=f.opt_text("created_at"),
        updated_at=f.opt_text("updated_at"),
        idempotency_key=idempotency_key,
        raw=f.data,
    )


def parse_transactions(data: object) -> TransactionPage:
    f = _Fields(data, "transaction page")
    rows: list[Transaction] = []
    for item in f.array("transactions"):
        t = _Fields(item, "transaction")
        rows.append(
            Transaction(
                transaction_id=t.text("transaction_id"),
                type=t.text("type"),
                kind=t.text("kind"),
                free_uses_delta=t.integer("free_uses_delta"),
                paid_uses_delta=t.integer("paid_uses_delta"),
                amount_minor=t.integer("amount_minor"),
                currency=t.text("currency"),
                description=t.opt_text("description"),
                external_transaction_id=t.opt_text("external_transaction_id"),
                created_at=t.text("created_at"),
                raw=t.data,
            )
        )
    return TransactionPage(
        account_id=f.text("account_id"),
        transactions=tuple(rows),
        total=f.integer("total"),
        limit=f.integer("limit"),
        offset=f.integer("offset"),
        has_more=f.flag("has_more"),
        raw=f.data,
    )


__all__ = [
    "Charge",
    "CreditCheck",
    "DroppedCharge",
    "FlushReport",
    "Offer",
    "PendingCharge",
    "Purchase",
    "Reservation",
    "ReservationPage",
    "Transaction",
    "TransactionPage",
]


def parse_lots(data: object) -> tuple[Lot, ...]:
    f = _Fields(data, "lots")
    found: list[Lot] = []
    for item in f.array("lots"):
        lot = _Fields(item, "lot")
        found.append(
            Lot(
                lot_id=lot.text("lot_id"),
                kind=lot.text("kind"),
                uses_granted=lot.integer("uses_granted"),
                uses_remaining=lot.integer("uses_remaining"),
                priority=lot.integer("priority"),
                expires_at=lot.opt_text("expires_at"),
                source=lot.text("source"),
                created_at=lot.text("created_at"),
                status=lot.text("status"),
                raw=lot.data,
            )
        )
    return tuple(found)
