"""Property test of the ledger: any interleaving of credit checks, charges, purchases, payments
(declined, 3-D Secure, paid), webhook redeliveries, refunds, disputes, grants and reservations
(hold, capture in part or whole, release, expiry by the recovery job) keeps the books.

A Hypothesis state machine drives the in-process app over HTTP (sandbox provider, signed
webhooks) and keeps its own model of every account (free, paid and held uses, total uses) and
of every purchase and hold. Every answer's status is predicted by the model; after every step the
API's balances (account and credit check: available and reserved uses) equal the model's, every
hold's status is the model's, no counter is below zero and `audit` finds no discrepancy.

Each example gets a fresh database (the session's PostgreSQL database, truncated) and a fresh app
on its own event loop.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Protocol, TypeVar

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing.audit import AuditReport, audit
from ciris_billing.db import accounts, create_engine, reservations, utcnow, webhook_events
from ciris_billing.db import purchases as purchases_table
from ciris_billing.deps import AppState
from ciris_billing.jobs import Recovery, RecoveryReport
from ciris_billing.payments.providers import signing
from tests.support.api import make_settings
from tests.support.postgres import TABLES

T = TypeVar("T")

SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    derandomize=True,  # the same runs every time
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=False,
)
PROVIDER = "oauth:google"
USERS = ["ledger-a@example.com", "ledger-b@example.com", "ledger-c@example.com"]
CARDS = {
    "visa": "4242 4242 4242 4242",
    "declined": "4000 0000 0000 9995",
    "3ds": "4000 0025 0000 3155",
}
CARD = st.sampled_from(["visa", "visa", "declined", "3ds"])  # mostly paid
# Idempotency keys, shared by charges, grants and refunds: reused often, sometimes elsewhere.
KEY = st.none() | st.sampled_from(["key-1", "key-2", "key-3"])
DISPUTE_STATUSES = ["needs_response", "under_review", "won", "lost", "warning_closed"]
WEBHOOK_SECRET = "whsec_ledger_properties_test"  # set below: a setting wins over the stored one
FREE_USES, PAID_USES, PRICE = 3, 20, 500
RESERVE = "/v1/billing/reservations"


@dataclass
class Book:
    """What one account should hold."""

    free: int = FREE_USES
    paid: int = 0
    held: int = 0  # by disputes
    total: int = 0
    reserved_free: int = 0  # by active reservations (not available)
    reserved_paid: int = 0
    # Paid uses a refund or a lost dispute could not take because holds had them: paid off
    # first when those holds give uses back; never more than reserved_paid.
    owed: int = 0

    def owe(self, shortfall: int) -> None:
        self.owed += max(0, min(shortfall, self.reserved_paid - self.owed))

    def settle(self, hold: Hold, paid_back: int) -> None:
        """The hold leaves: its reserved uses go, `paid_back` of its paid ones come back
        after what is owed is paid off (a captured one's owed uses were spent)."""
        self.reserved_free -= hold.free
        self.reserved_paid -= hold.paid
        paid_off = min(self.owed, paid_back)
        self.owed = min(self.owed - paid_off, self.reserved_paid)
        self.paid += paid_back - paid_off


@dataclass
class Hold:
    """What one reservation should be: its uses, their split, its status."""

    user: str
    free: int
    paid: int
    status: str = "held"  # then "captured", "released" or "expired"

    @property
    def uses(self) -> int:
        return self.free + self.paid


@dataclass
class Bought:
    """What one purchase should be, at the provider and here."""

    user: str
    client_secret: str
    provider_status: str = "requires_payment_method"
    status: str = "pending"  # as stored: our own words (the API shows requires_payment_method)
    credited: bool = False
    refunded_minor: int = 0
    uses_refunded: int = 0
    dispute: str | None = None  # None, then "open", "won" or "lost"
    held: int = 0
    reserved: int = 0  # unused uses holds had when the dispute opened (a lost one takes them)


@dataclass
class Model:
    books: dict[str, Book] = field(default_factory=dict)
    bought: dict[str, Bought] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)
    # (API key's scope, idempotency key) → (the request that took it, its status, its body):
    # keys are scoped to the API key that sent them (one API key per scope here).
    keys: dict[tuple[str, str], tuple[Any, int, Any]] = field(default_factory=dict)

    def book(self, user: str) -> Book:
        """The account, created with its free uses on first sight."""
        return self.books.setdefault(user, Book())


def who(user: str) -> dict[str, str]:
    return {"oauth_provider": PROVIDER, "external_id": user}


def uses_for_refund(refunded_minor: int) -> int:
    return -(-PAID_USES * refunded_minor // PRICE)  # rounded up


class Databases(Protocol):
    async def fresh(self) -> str:
        """The URL of an empty, migrated database."""
        ...


class Ledger(RuleBasedStateMachine):
    databases: ClassVar[Databases]  # set by the test, per kind of database
    purchases = Bundle("purchases")

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.sent: list[tuple[Callable[..., None], dict[str, Any]]] = []
        self.loop = asyncio.new_event_loop()
        self.stack = AsyncExitStack()
        try:
            self.run(self._start())
        except BaseException:
            self.teardown()
            raise

    async def _start(self) -> None:
        database_url = await self.databases.fresh()
        # No rate limits here: the property is about the books, not about floods.
        app = create_app(
            make_settings(
                database_url,
                rate_limit_key_per_second=0,
                rate_limit_account_per_minute=0,
                log_level="WARNING",
                sandbox_webhook_secret=WEBHOOK_SECRET,
            )
        )
        await self.stack.enter_async_context(app.router.lifespan_context(app))
        self.state: AppState = app.state.billing
        self.engine: AsyncEngine = self.state.engine
        self.keys: dict[str, str] = {}
        async with self.engine.begin() as conn:
            for scope in auth.SCOPES:
                _key_id, self.keys[scope] = await auth.create_key(
                    conn, f"ledger-{scope}", frozenset({scope})
                )
        self.http = await self.stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://billing")
        )

    def teardown(self) -> None:
        try:
            self.run(self.stack.aclose())
        finally:
            self.loop.close()

    def run(self, coroutine: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def post(
        self, path: str, body: Any, scope: str | None = "write", key: str | None = None
    ) -> httpx.Response:
        headers = {} if scope is None else {"X-API-Key": self.keys[scope]}
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.run(self.http.post(path, json=body, headers=headers))

    def replayed(self, scope: str, key: str | None, request: Any, response: httpx.Response) -> bool:
        """Whether the answer came from an earlier request under this API key's key: the same
        request gets the first answer again (and nothing happens), another request a 409."""
        if key is None or (scope, key) not in self.model.keys:
            return False
        first_request, first_status, first_body = self.model.keys[scope, key]
        if request == first_request:
            assert response.status_code == first_status, (key, response.text)
            assert response.headers.get("Idempotent-Replayed") == "true", key
            assert response.json() == first_body, (key, first_body, response.json())
        else:
            assert response.status_code == 409, (key, first_request, request, response.text)
            assert response.json()["error"] == "idempotency_key_reused", response.text
        return True

    def keyed(self, step: Callable[..., None], **arguments: Any) -> None:
        step(**arguments)
        if arguments["key"] is not None:
            self.sent.append((step, arguments))

    @precondition(lambda self: bool(self.sent))
    @rule(pick=st.integers(0, 100))
    def retry(self, pick: int) -> None:
        """A client retry: an earlier keyed charge, grant or refund sent again as it was."""
        step, arguments = self.sent[pick % len(self.sent)]
        step(**arguments)

    def remember(self, scope: str, key: str | None, request: Any, response: httpx.Response) -> None:
        """A request that succeeded holds its API key's key; one that failed recorded nothing."""
        if key is not None and response.is_success:
            self.model.keys[scope, key] = (request, response.status_code, response.json())

    def get(self, path: str, scope: str = "read") -> httpx.Response:
        return self.run(self.http.get(path, headers={"X-API-Key": self.keys[scope]}))

    # --- rules: each predicts the answer from the model, then updates the model ---

    @rule(user=st.sampled_from(USERS))
    def check(self, user: str) -> None:
        response = self.post("/v1/billing/credits/check", who(user), scope="read")
        assert response.status_code == 200, response.text
        book = self.model.book(user)
        body = response.json()
        assert (body["free_uses_remaining"], body["credits_remaining"]) == (book.free, book.paid)
        assert body["has_credit"] is (book.free + book.paid > 0)
        assert body["purchase_required"] is (book.free + book.paid == 0)
        assert body["held_uses"] == book.reserved_free + book.reserved_paid

    @rule(user=st.sampled_from(USERS), uses=st.integers(1, 3), key=KEY)
    def charge(self, user: str, uses: int, key: str | None) -> None:
        self.keyed(self._charge, user=user, uses=uses, key=key)

    def _charge(self, user: str, uses: int, key: str | None) -> None:
        request = ("/v1/billing/charges", {**who(user), "uses": uses})
        response = self.post(*request, key=key)
        if self.replayed("write", key, request, response):
            return
        self.remember("write", key, request, response)
        book = self.model.books.get(user, Book())
        if book.free + book.paid < uses:
            assert response.status_code == 402, response.text
            assert response.json()["error"] == "purchase_required"
            return
        assert response.status_code == 201, response.text
        free_used = min(book.free, uses)
        book.free -= free_used
        book.paid -= uses - free_used
        book.total += uses
        self.model.books[user] = book
        body = response.json()
        assert (body["free_uses_used"], body["paid_uses_used"]) == (free_used, uses - free_used)
        assert (body["free_uses_remaining"], body["credits_remaining"]) == (book.free, book.paid)

    @initialize(target=purchases, user=st.sampled_from(USERS))
    def paid_purchase(self, user: str) -> str:
        """Every run starts with a paid purchase, so refunds and disputes have work to do."""
        return self._purchase(user, "visa")

    @rule(target=purchases, user=st.sampled_from(USERS), card=st.none() | CARD)
    def purchase(self, user: str, card: str | None) -> str:
        """Start a purchase, and maybe pay it at once (as the payment page does)."""
        return self._purchase(user, card)

    def _purchase(self, user: str, card: str | None) -> str:
        response = self.post("/v1/billing/purchases", who(user))
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["amount_minor"], body["uses_purchased"]) == (PRICE, PAID_USES)
        self.model.book(user)
        payment_id: str = body["payment_id"]
        self.model.bought[payment_id] = Bought(user, body["client_secret"])
        if card is not None:
            self._pay(payment_id, card)
        return payment_id

    @rule(payment_id=purchases, card=CARD)
    def pay(self, payment_id: str, card: str) -> None:
        self._pay(payment_id, card)

    def _pay(self, payment_id: str, card: str) -> None:
        bought = self.model.bought[payment_id]
        response = self.post(
            f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
            {"client_secret": bought.client_secret, "card_number": CARDS[card]},
            scope=None,
        )
        if bought.provider_status != "requires_payment_method":
            assert response.status_code == 409, response.text
        elif card == "declined":
            assert response.status_code == 402, response.text
            bought.status = "failed"
        elif card == "3ds":
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "requires_action"
            bought.provider_status = bought.status = "requires_action"
        else:
            assert response.status_code == 200, response.text
            self._paid(bought)

    @rule(payment_id=purchases, success=st.booleans())
    def authenticate(self, payment_id: str, success: bool) -> None:
        """3-D Secure on any purchase: a 409 unless it is waiting for it."""
        self._authenticate(payment_id, success)

    @precondition(lambda self: self._waiting())
    @rule(pick=st.integers(0, 100), success=st.booleans())
    def authenticate_waiting(self, pick: int, success: bool) -> None:
        """3-D Secure on a purchase that waits for it (rare enough by chance alone)."""
        waiting = self._waiting()
        self._authenticate(waiting[pick % len(waiting)], success)

    def _waiting(self) -> list[str]:
        return [p for p, b in self.model.bought.items() if b.provider_status == "requires_action"]

    def _authenticate(self, payment_id: str, success: bool) -> None:
        bought = self.model.bought[payment_id]
        response = self.post(
            f"/v1/billing/sandbox/payment_intents/{payment_id}/authenticate",
            {"client_secret": bought.client_secret, "success": success},
            scope=None,
        )
        if bought.provider_status != "requires_action":
            assert response.status_code == 409, response.text
            return
        assert response.status_code == 200, response.text
        if success:
            self._paid(bought)
        else:
            bought.provider_status = "requires_payment_method"
            bought.status = "failed"

    def _paid(self, bought: Bought) -> None:
        bought.provider_status = bought.status = "succeeded"
        bought.credited = True
        self.model.book(bought.user).paid += PAID_USES

    @rule(
        payment_id=purchases,
        amount=st.none() | st.integers(1, 150) | st.integers(1, 600),
        key=KEY,
    )
    def refund(self, payment_id: str, amount: int | None, key: str | None) -> None:
        self.keyed(self._refund, payment_id=payment_id, amount=amount, key=key)

    def _refund(self, payment_id: str, amount: int | None, key: str | None) -> None:
        bought = self.model.bought[payment_id]
        request = (
            f"/v1/billing/purchases/{payment_id}/refund",
            {} if amount is None else {"amount_minor": amount},
        )
        response = self.post(*request, scope="admin", key=key)
        if self.replayed("admin", key, request, response):
            return
        self.remember("admin", key, request, response)
        left = PRICE - bought.refunded_minor
        if not bought.credited or bought.dispute in ("open", "lost"):
            assert response.status_code == 409, response.text  # no refund while disputed
            return
        if left == 0 or (amount is not None and amount > left):
            assert response.status_code == 422, response.text
            assert response.json()["error"] == "refund_exceeds_payment"
            return
        assert response.status_code == 201, response.text
        book = self.model.book(bought.user)
        bought.refunded_minor += left if amount is None else amount
        target = uses_for_refund(bought.refunded_minor)
        take = min(target - bought.uses_refunded, book.paid)
        book.paid -= take
        book.owe(target - bought.uses_refunded - take)
        bought.uses_refunded = target
        bought.status = "refunded" if bought.refunded_minor == PRICE else "partially_refunded"
        body = response.json()
        assert (body["refunded_minor"], body["uses_refunded"]) == (
            bought.refunded_minor,
            bought.uses_refunded,
        )
        assert body["purchase_status"] == bought.status

    @rule(payment_id=purchases, status=st.sampled_from(DISPUTE_STATUSES))
    def dispute(self, payment_id: str, status: str) -> None:
        bought = self.model.bought[payment_id]
        response = self.post(
            f"/v1/billing/sandbox/payment_intents/{payment_id}/dispute",
            {"status": status},
            scope="admin",
        )
        if bought.provider_status != "succeeded":
            assert response.status_code == 409, response.text
            return
        assert response.status_code == 200, response.text
        book = self.model.book(bought.user)
        if bought.dispute is None:  # the first event holds the purchase's unused uses
            unused = PAID_USES - bought.uses_refunded
            bought.held = max(0, min(unused, book.paid))
            bought.reserved = max(0, min(unused - bought.held, book.reserved_paid))
            book.paid -= bought.held
            book.held += bought.held
            bought.dispute = "open"
        closing = (
            "won" if status in ("won", "warning_closed") else "lost" if status == "lost" else None
        )
        if bought.dispute == "open" and closing is not None:
            book.held -= bought.held
            if closing == "won":
                book.paid += bought.held
            else:  # what holds had at its opening goes back like a refund's
                take = min(bought.reserved, book.paid)
                book.paid -= take
                book.owe(bought.reserved - take)
            bought.dispute = closing

    @rule(user=st.sampled_from(USERS), uses=st.integers(-25, 25).filter(bool), key=KEY)
    def grant(self, user: str, uses: int, key: str | None) -> None:
        self.keyed(self._grant, user=user, uses=uses, key=key)

    def _grant(self, user: str, uses: int, key: str | None) -> None:
        request = ("/v1/billing/credits", {**who(user), "uses": uses, "reason": "test"})
        response = self.post(*request, scope="admin", key=key)
        if self.replayed("admin", key, request, response):
            return
        self.remember("admin", key, request, response)
        book = self.model.books.get(user, Book())
        if book.paid + uses < 0:
            assert response.status_code == 422, response.text
            assert response.json()["error"] == "adjustment_below_zero"
            return  # the transaction is rolled back: not even the account is created
        assert response.status_code == 201, response.text
        book.paid += uses
        self.model.books[user] = book
        assert response.json()["account"]["credits_remaining"] == book.paid

    @rule(pick=st.integers(0, 10_000), as_new_event=st.booleans())
    def redeliver(self, pick: int, as_new_event: bool) -> None:
        """A stored webhook event again, freshly signed: the same event (a duplicate) or the
        same content under a new event id (handled again, from the provider's current state).
        Either way the books do not move."""
        stored = self.run(self._stored_events())
        if not stored:
            return
        event_id, payload = stored[pick % len(stored)]
        event = json.loads(payload)
        if as_new_event:
            event["id"] = f"evt_again_{uuid.uuid4().hex[:12]}"
        body = json.dumps(event).encode()
        response = self.run(
            self.http.post(
                "/v1/billing/webhooks/sandbox",
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "Stripe-Signature": signing.sign(body, WEBHOOK_SECRET),
                },
            )
        )
        assert response.status_code == 200, response.text
        outcome = response.json()["outcome"]
        if not as_new_event:
            assert outcome == "duplicate", (event_id, outcome)
        else:
            changed = {"credited", "refunded", "credited_and_refunded", "held"}
            assert outcome not in changed | {"dispute_won", "dispute_lost"}, (event, outcome)

    async def _stored_events(self) -> list[tuple[str, str]]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(webhook_events.c.event_id, webhook_events.c.payload).order_by(
                    webhook_events.c.received_at, webhook_events.c.event_id
                )
            )
            return [(row.event_id, row.payload) for row in rows]

    # --- reservations: hold, capture (part or all), release, expiry by the recovery job ---

    @rule(user=st.sampled_from(USERS), uses=st.integers(1, 6), key=KEY)
    def reserve(self, user: str, uses: int, key: str | None) -> None:
        self.keyed(self._reserve, user=user, uses=uses, key=key)

    def _reserve(self, user: str, uses: int, key: str | None) -> None:
        request = (RESERVE, {**who(user), "uses": uses})
        response = self.post(*request, key=key)
        book = self.model.book(user)  # created as a check would, even when the hold is refused
        if self.replayed("write", key, request, response):
            return
        self.remember("write", key, request, response)
        if book.free + book.paid < uses:
            assert response.status_code == 402, response.text
            assert response.json()["error"] == "purchase_required"
            return
        assert response.status_code == 201, response.text
        free = min(book.free, uses)  # free uses are held first
        hold = Hold(user, free, uses - free)
        book.free -= hold.free
        book.paid -= hold.paid
        book.reserved_free += hold.free
        book.reserved_paid += hold.paid
        body = response.json()
        self.model.holds[body["reservation_id"]] = hold
        assert (body["status"], body["uses"]) == ("held", uses)
        assert (body["free_uses_remaining"], body["credits_remaining"], body["held_uses"]) == (
            book.free,
            book.paid,
            book.reserved_free + book.reserved_paid,
        )

    def _pick_hold(self, pick: int, held_only: bool) -> str | None:
        chosen = [r for r, h in self.model.holds.items() if h.status == "held" or not held_only]
        return chosen[pick % len(chosen)] if chosen else None

    @precondition(lambda self: bool(self.model.holds))
    @rule(
        pick=st.integers(0, 100),
        held_only=st.booleans(),
        uses=st.none() | st.integers(1, 7),
        key=KEY,
    )
    def capture(self, pick: int, held_only: bool, uses: int | None, key: str | None) -> None:
        """Capture a hold (mostly an active one), all of it or a part, or more than it holds."""
        reservation_id = self._pick_hold(pick, held_only)
        if reservation_id is not None:
            self.keyed(self._capture, reservation_id=reservation_id, uses=uses, key=key)

    def _capture(self, reservation_id: str, uses: int | None, key: str | None) -> None:
        request = (
            f"{RESERVE}/{reservation_id}/capture",
            {} if uses is None else {"uses": uses},
        )
        response = self.post(*request, key=key)
        if self.replayed("write", key, request, response):
            return
        self.remember("write", key, request, response)
        hold = self.model.holds[reservation_id]
        if hold.status != "held":
            assert response.status_code == 409, response.text
            wanted = "reservation_expired" if hold.status == "expired" else "reservation_not_held"
            assert response.json()["error"] == wanted, response.text
            return
        taken = hold.uses if uses is None else uses
        if taken > hold.uses:
            assert response.status_code == 422, response.text
            return
        assert response.status_code == 201, response.text  # a hold is a promise
        book = self.model.book(hold.user)
        free_used = min(taken, hold.free)  # free uses are charged first
        paid_used = taken - free_used
        book.settle(hold, hold.paid - paid_used)
        book.free += hold.free - free_used
        book.total += taken
        hold.status = "captured"
        body = response.json()
        assert (body["uses"], body["free_uses_used"], body["paid_uses_used"]) == (
            taken,
            free_used,
            paid_used,
        )
        assert body["released_uses"] == hold.uses - taken
        assert (body["free_uses_remaining"], body["credits_remaining"], body["total_uses"]) == (
            book.free,
            book.paid,
            book.total,
        )

    @precondition(lambda self: bool(self.model.holds))
    @rule(pick=st.integers(0, 100), held_only=st.booleans())
    def release(self, pick: int, held_only: bool) -> None:
        """Release a hold: all its uses back once; again (or expired) changes nothing."""
        reservation_id = self._pick_hold(pick, held_only)
        if reservation_id is None:
            return
        response = self.post(f"{RESERVE}/{reservation_id}/release", {})
        hold = self.model.holds[reservation_id]
        if hold.status == "captured":
            assert response.status_code == 409, response.text
            return
        assert response.status_code == 200, response.text
        if hold.status == "held":
            self._give_back(hold)
            hold.status = "released"
        assert response.json()["status"] == hold.status

    @precondition(lambda self: self._pick_hold(0, held_only=True) is not None)
    @rule(pick=st.integers(0, 100), capture_first=st.booleans())
    def expire(self, pick: int, capture_first: bool) -> None:
        """A hold's TTL passes (its expires_at set in the past); the recovery job's expiry step
        then releases it. Before the job runs, the clock alone refuses its capture (409)."""
        reservation_id = self._pick_hold(pick, held_only=True)
        assert reservation_id is not None
        self.run(self._expire_now(reservation_id))
        if capture_first:
            late = self.post(f"{RESERVE}/{reservation_id}/capture", {})
            assert late.status_code == 409, late.text
            assert late.json()["error"] == "reservation_expired", late.text
        report = RecoveryReport()
        recovery = Recovery(self.state.settings, self.engine, self.state.provider)
        self.run(recovery.expire_holds(report))
        assert (report.expired, report.failures) == (1, 0), report
        hold = self.model.holds[reservation_id]
        self._give_back(hold)
        hold.status = "expired"

    async def _expire_now(self, reservation_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                reservations.update()
                .where(reservations.c.id == reservation_id)
                .values(expires_at=utcnow() - timedelta(seconds=1))
            )

    def _give_back(self, hold: Hold) -> None:
        """All the hold's uses back, each to the counter it came from."""
        book = self.model.book(hold.user)
        book.settle(hold, hold.paid)
        book.free += hold.free

    # --- after every step ---

    @invariant()
    def books_balance(self) -> None:
        """The API's balances are the model's; the database's counters and ledger agree."""
        state = self.run(self._observe())
        assert state.audit.clean, state.audit.discrepancies
        for user, response in zip(USERS, state.accounts, strict=True):
            book = self.model.books.get(user)
            if book is None:
                assert response.status_code == 404, response.text
                continue
            assert response.status_code == 200, response.text
            body = response.json()
            actual = (body["free_uses_remaining"], body["credits_remaining"], body["total_uses"])
            assert actual == (book.free, book.paid, book.total), (user, actual, book)
            assert body["balance_minor"] == book.paid
            assert body["held_uses"] == book.reserved_free + book.reserved_paid, (user, body, book)
            assert state.held.get(user, 0) == book.held, (user, state.held, book)
            assert state.reserved[user] == (book.reserved_free, book.reserved_paid), (user, book)
            assert state.owed[user] == book.owed, (user, state.owed, book)
            checked = state.checks[user].json()
            assert (
                checked["has_credit"],
                checked["free_uses_remaining"],
                checked["credits_remaining"],
                checked["held_uses"],
            ) == (
                book.free + book.paid > 0,
                book.free,
                book.paid,
                book.reserved_free + book.reserved_paid,
            ), (user, checked, book)
            assert min(book.free, book.paid, book.held, book.reserved_free, book.reserved_paid) >= 0
            assert 0 <= book.owed <= book.reserved_paid
        assert state.holds == {r: h.status for r, h in self.model.holds.items()}
        expected = {
            payment_id: (b.status, b.credited, b.refunded_minor, b.uses_refunded)
            for payment_id, b in self.model.bought.items()
        }
        assert state.purchases == expected

    async def _observe(self) -> Observed:
        headers = {"X-API-Key": self.keys["read"]}
        responses = await asyncio.gather(
            *(
                self.http.get(f"/v1/billing/accounts/{PROVIDER}/{user}", headers=headers)
                for user in USERS
            )
        )
        # The credit check of the accounts the model knows (a check creates an unknown one).
        known = [user for user in USERS if user in self.model.books]
        checks = await asyncio.gather(
            *(
                self.http.post("/v1/billing/credits/check", json=who(user), headers=headers)
                for user in known
            )
        )
        async with self.engine.connect() as conn:
            report = await audit(conn)
            held = list(
                await conn.execute(
                    select(
                        accounts.c.external_id,
                        accounts.c.held_uses,
                        accounts.c.reserved_free_uses,
                        accounts.c.reserved_paid_uses,
                        accounts.c.refund_owed_uses,
                    )
                )
            )
            holds = await conn.execute(select(reservations.c.id, reservations.c.status))
            bought = await conn.execute(select(purchases_table))
            return Observed(
                accounts=list(responses),
                checks=dict(zip(known, checks, strict=True)),
                audit=report,
                held={row.external_id: int(row.held_uses) for row in held},
                reserved={
                    row.external_id: (int(row.reserved_free_uses), int(row.reserved_paid_uses))
                    for row in held
                },
                owed={row.external_id: int(row.refund_owed_uses) for row in held},
                holds={row.id: row.status for row in holds},
                purchases={
                    row.payment_id: (
                        row.status,  # as stored: our own words
                        row.credited_at is not None,
                        int(row.refunded_minor),
                        int(row.uses_refunded),
                    )
                    for row in bought
                },
            )


@dataclass
class Observed:
    accounts: list[httpx.Response]
    checks: dict[str, httpx.Response]
    audit: AuditReport
    held: dict[str, int]
    reserved: dict[str, tuple[int, int]]
    owed: dict[str, int]
    holds: dict[str, str]
    purchases: dict[str, tuple[str, bool, int, int]]


@dataclass
class TruncatedPostgres:
    """The session's PostgreSQL database, emptied per example."""

    url: str

    async def fresh(self) -> str:
        engine = create_engine(self.url)
        try:
            async with engine.begin() as conn:
                await conn.execute(text(f"TRUNCATE {TABLES} CASCADE"))
        finally:
            await engine.dispose()
        return self.url


@pytest.mark.slow
def test_any_interleaving_keeps_the_books(postgres_url: str) -> None:
    databases: Databases = TruncatedPostgres(postgres_url)

    class LedgerOnThisDatabase(Ledger):
        pass

    LedgerOnThisDatabase.databases = databases
    run_state_machine_as_test(LedgerOnThisDatabase, settings=SETTINGS)
