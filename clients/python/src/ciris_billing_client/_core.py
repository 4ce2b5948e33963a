"""The client's one implementation: requests, parsing, retries, idempotency and fail-open.

Every API call is a *program*: a generator that yields steps (an `httpx.Request` to send, or a
`Sleep`) and is sent back each step's reply (the `httpx.Response`, or the `httpx.TransportError`
the send raised). The sync and async clients only run programs; they do the I/O and nothing
else, so both behave identically by construction.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeAlias, TypeVar
from urllib.parse import quote

import httpx

from ciris_billing_client._version import __version__
from ciris_billing_client.errors import (
    AccountSuspendedError,
    AuthenticationError,
    BillingError,
    BillingUnavailableError,
    IdempotencyConflictError,
    NotFoundError,
    Offer,
    PurchaseRequiredError,
    ReservationExpiredError,
    ReservationNotHeldError,
)
from ciris_billing_client.models import (
    Charge,
    CreditCheck,
    DroppedCharge,
    FlushReport,
    Lot,
    PendingCharge,
    Purchase,
    Reservation,
    ReservationPage,
    TransactionPage,
    _Fields,
    degraded_check,
    parse_charge,
    parse_check,
    parse_lots,
    parse_purchase,
    parse_reservation,
    parse_reservations,
    parse_transactions,
)

log = logging.getLogger("ciris_billing.client")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Step: TypeAlias = httpx.Request | Sleep
Reply: TypeAlias = httpx.Response | httpx.TransportError | None
Program: TypeAlias = Generator[Step, Reply, T]

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
RETRY_AFTER_STATUSES = frozenset({429, 503})
CHECK_PATH = "/v1/billing/credits/check"
CHARGES_PATH = "/v1/billing/charges"
PURCHASES_PATH = "/v1/billing/purchases"
TRANSACTIONS_PATH = "/v1/billing/transactions"
ACCOUNTS_PATH = "/v1/billing/accounts"
RESERVATIONS_PATH = "/v1/billing/reservations"


@dataclass(frozen=True, slots=True)
class Call:
    """One logical API call; its attempts all carry the same idempotency key."""

    method: str
    path: str
    body: Mapping[str, Any] | None = None
    params: Mapping[str, str | int] | None = None
    idempotency_key: str | None = None
    # Safe to repeat, so a 500 is retried too: reads, checks and keyed mutations.
    idempotent: bool = True
    # RFC 7240 preferences (a charge asks for `next-check`: the next credit check's answer).
    prefer: str | None = None


def new_idempotency_key() -> str:
    return str(uuid.uuid4())


def event(level: int, name: str, **fields: Any) -> None:
    """One log line: the event name, then key=value pairs (also on the record as attributes
    `event` and `billing_fields`, for structured handlers)."""
    text = " ".join([name, *(f"{key}={value}" for key, value in fields.items())])
    log.log(level, "%s", text, extra={"event": name, "billing_fields": fields})


def retry_after_seconds(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """A Retry-After header (delta-seconds or an HTTP date) in seconds; None if absent/invalid."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN is not a delay
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now())


def response_json(response: httpx.Response) -> object:
    try:
        data: object = response.json()
    except ValueError:
        raise BillingError(
            f"The billing service answered HTTP {response.status_code} without JSON",
            status=response.status_code,
            code="invalid_response",
        ) from None
    return data


def error_for(response: httpx.Response) -> BillingError:
    """The exception for a non-2xx answer, from the service's `{"error", "detail"}` body."""
    status = response.status_code
    try:
        data = response.json()
    except ValueError:
        data = None
    body: dict[str, Any] = data if isinstance(data, dict) else {}
    code = body.get("error")
    code = code if isinstance(code, str) else f"http_{status}"
    detail = body.get("detail")
    if not isinstance(detail, str):
        detail = response.text[:200] or response.reason_phrase
    if status == 402 and code == "purchase_required":
        try:
            fields = _Fields(body, "purchase offer")
            offer = Offer(
                price_minor=fields.integer("purchase_price_minor"),
                uses=fields.integer("purchase_uses"),
                currency=fields.text("currency"),
            )
            checkout_url = fields.opt_text("checkout_url")
            portal_url = fields.opt_text("portal_url")
        except BillingError:
            pass
        else:
            return PurchaseRequiredError(
                detail,
                offer=offer,
                checkout_url=checkout_url,
                portal_url=portal_url,
                status=status,
                body=body,
            )
    cls: type[BillingError] = BillingError
    if status == 403 and code == "account_suspended":
        cls = AccountSuspendedError
    elif status in (401, 403):
        cls = AuthenticationError
    elif status == 404:
        cls = NotFoundError
    elif status == 409 and code == "reservation_expired":
        cls = ReservationExpiredError
    elif status == 409 and code == "reservation_not_held":
        cls = ReservationNotHeldError
    elif status == 409:
        cls = IdempotencyConflictError
    return cls(detail, status=status, code=code, body=body)


def charge_call(charge: PendingCharge) -> Call:
    """The one way a charge becomes a request: a queued charge is flushed byte-for-byte as it
    was first sent, so the server's idempotency check replays rather than conflicts."""
    body: dict[str, Any] = {
        "oauth_provider": charge.oauth_provider,
        "external_id": charge.external_id,
        "amount_minor": charge.amount_minor,
        "metadata": dict(charge.metadata),
    }
    if charge.feature is None:
        body["uses"] = charge.uses
    else:  # rated: the service turns the quantity into uses by the feature's rate
        body["feature"] = charge.feature
        body["quantity"] = charge.quantity
    if charge.currency is not None:
        body["currency"] = charge.currency
    if charge.description is not None:
        body["description"] = charge.description
    return Call(
        "POST", CHARGES_PATH, body=body, idempotency_key=charge.idempotency_key, prefer=NEXT_CHECK
    )


NEXT_CHECK = "next-check"
# At most this many users' next checks are kept (the oldest go first).
MAX_NEXT_CHECKS = 10_000


class ClientCore:
    """Configuration, policy and state shared by `BillingClient` and `AsyncBillingClient`."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float,
        max_retries: int,
        backoff: float,
        max_backoff: float,
        fail_open_grace_seconds: float | None,
        check_reuse_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, not {base_url!r}")
        if not api_key:
            raise ValueError("api_key is required")
        if max_retries < 0 or backoff < 0 or max_backoff < 0 or timeout <= 0:
            raise ValueError("timeout must be > 0; max_retries, backoff, max_backoff >= 0")
        if fail_open_grace_seconds is not None and fail_open_grace_seconds < 0:
            raise ValueError("fail_open_grace_seconds must be >= 0 (or None: fail closed)")
        if check_reuse_seconds < 0:
            raise ValueError("check_reuse_seconds must be >= 0 (0: every check asks)")
        self.check_reuse_seconds = check_reuse_seconds
        # (provider, external id) -> (the next check's answer, when it was given): a charge's
        # answer says what the user's next check would; that check is answered from it once.
        self._next_checks: OrderedDict[tuple[str, str], tuple[CreditCheck, float]] = OrderedDict()
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.fail_open_grace_seconds = fail_open_grace_seconds
        self._clock = clock
        self._timeout = httpx.Timeout(timeout).as_dict()
        self._headers = {
            "X-API-Key": api_key,
            "Accept": "application/json",
            "User-Agent": f"ciris-billing-client/{__version__}",
        }
        self._unreachable_since: float | None = None
        self._outbox: dict[str, PendingCharge] = {}
        self._in_flight: set[str] = set()
        self._lock = threading.Lock()

    # -- state -------------------------------------------------------------------------

    @property
    def pending_charges(self) -> tuple[PendingCharge, ...]:
        with self._lock:
            return tuple(self._outbox.values())

    @property
    def unreachable_for(self) -> float | None:
        """Seconds since the first failure of the current outage; None while reachable."""
        since = self._unreachable_since
        return None if since is None else self._clock() - since

    def _fail_open_allowed(self) -> bool:
        unreachable_for = self.unreachable_for
        return (
            self.fail_open_grace_seconds is not None
            and unreachable_for is not None
            and unreachable_for < self.fail_open_grace_seconds
        )

    # -- one request, with retries ----------------------------------------------------

    def build(self, call: Call) -> httpx.Request:
        headers = dict(self._headers)
        if call.idempotency_key is not None:
            headers["Idempotency-Key"] = call.idempotency_key
        if call.prefer is not None:
            headers["Prefer"] = call.prefer
        return httpx.Request(
            call.method,
            self.base_url + call.path,
            params=dict(call.params) if call.params is not None else None,
            json=dict(call.body) if call.body is not None else None,
            headers=headers,
            extensions={"timeout": self._timeout},
        )

    def backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter: in [d/2, d], d = min(max_backoff, backoff*2^(n-1))."""
        ceiling = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return ceiling / 2 + random.random() * ceiling / 2

    def exchange(self, call: Call, max_retries: int | None = None) -> Program[httpx.Response]:
        """Send `call` until the service gives an answer that is not transient; returns it.

        Retried: connection errors and timeouts, 429/502/503/504, and 500 when the call is
        idempotent. Never 4xx (but 429). Retry-After on 429/503 is honoured up to
        `max_backoff`; a longer one ends the retries. Raises BillingUnavailableError when the
        retries are exhausted (BillingError for a persistent 429: billing is up, only busy).
        """
        retries = self.max_retries if max_retries is None else max_retries
        attempt = 0
        while True:
            attempt += 1
            reply = yield self.build(call)
            status: int | None = None
            retry_after: float | None = None
            if isinstance(reply, httpx.Response):
                status = reply.status_code
                if not (status in RETRYABLE_STATUSES or (status == 500 and call.idempotent)):
                    self._unreachable_since = None
                    return reply
                problem = f"HTTP {status}"
                if status in RETRY_AFTER_STATUSES:
                    retry_after = retry_after_seconds(reply.headers.get("Retry-After"))
            elif isinstance(reply, httpx.TransportError):
                problem = f"{type(reply).__name__}: {reply}".rstrip(": ")
            else:
                raise TypeError("a client shell must reply with a response or a transport error")
            if status != 429 and self._unreachable_since is None:
                self._unreachable_since = self._clock()
            too_long = retry_after is not None and retry_after > self.max_backoff
            if attempt > retries or too_long:
                raise self._gave_up(call, attempt, problem, reply)
            delay = self.backoff_delay(attempt)
            if retry_after is not None:
                delay = max(delay, retry_after)
            event(
                logging.INFO,
                "billing_request_retry",
                call=f"{call.method} {call.path}",
                attempt=attempt,
                problem=problem,
                delay=round(delay, 3),
            )
            yield Sleep(delay)

    def _gave_up(self, call: Call, attempts: int, problem: str, reply: Reply) -> BillingError:
        if isinstance(reply, httpx.Response) and reply.status_code == 429:
            error = error_for(reply)
            error.detail = f"Rate limited after {attempts} attempt(s): {error.detail}"
            return error
        status = reply.status_code if isinstance(reply, httpx.Response) else None
        body = error_for(reply).body if isinstance(reply, httpx.Response) else None
        return BillingUnavailableError(
            f"Billing unreachable for {call.method} {call.path} after {attempts} "
            f"attempt(s): {problem}",
            attempts=attempts,
            status=status,
            body=body,
        )

    def call(self, call: Call) -> Program[httpx.Response]:
        """`exchange`, then: a 2xx flushes pending charges and is returned; else it raises."""
        response = yield from self.exchange(call)
        if not response.is_success:
            raise error_for(response)
        if self._outbox:
            # Billing is back: send what was queued. One attempt each (the next call retries),
            # so a successful call is not held up by a flaky flush.
            yield from self.flush(max_retries=0)
        return response

    # -- the API -----------------------------------------------------------------------

    def check(
        self,
        oauth_provider: str,
        external_id: str,
        context: Mapping[str, Any] | None = None,
        customer_email: str | None = None,
    ) -> Program[CreditCheck]:
        body: dict[str, Any] = {
            "oauth_provider": oauth_provider,
            "external_id": external_id,
            "context": dict(context or {}),
        }
        if customer_email is not None:
            body["customer_email"] = customer_email
        known = self._next_check(oauth_provider, external_id)
        if known is not None:
            return known
        try:
            response = yield from self.call(Call("POST", CHECK_PATH, body=body))
        except BillingUnavailableError as exc:
            if not self._fail_open_allowed():
                self._fail_closed("check", oauth_provider, external_id, exc)
                raise
            event(
                logging.WARNING,
                "billing_fail_open_check",
                oauth_provider=oauth_provider,
                external_id=external_id,
                unreachable_for=round(self.unreachable_for or 0.0, 3),
                grace_seconds=self.fail_open_grace_seconds,
                error=exc.detail,
            )
            return degraded_check()
        return parse_check(response_json(response))

    def charge(
        self,
        oauth_provider: str,
        external_id: str,
        *,
        uses: int = 1,
        amount_minor: int = 0,
        currency: str | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        feature: str | None = None,
        quantity: int | None = None,
    ) -> Program[Charge]:
        if (feature is None) != (quantity is None):
            raise ValueError("feature and quantity go together")
        if feature is not None and uses != 1:
            raise ValueError("give uses, or feature and quantity, not both")
        request = PendingCharge(
            oauth_provider=oauth_provider,
            external_id=external_id,
            uses=uses,
            amount_minor=amount_minor,
            currency=currency,
            description=description,
            metadata=dict(metadata or {}),
            idempotency_key=new_idempotency_key() if idempotency_key is None else idempotency_key,
            queued_at=0.0,
            feature=feature,
            quantity=quantity,
        )
        # Whatever this charge's outcome, an earlier charge's answer no longer says the next
        # check's.
        with self._lock:
            self._next_checks.pop((oauth_provider, external_id), None)
        try:
            response = yield from self.call(charge_call(request))
        except BillingUnavailableError as exc:
            if not self._fail_open_allowed():
                self._fail_closed("charge", oauth_provider, external_id, exc)
                raise
            queued = replace(request, queued_at=time.time())
            with self._lock:
                self._outbox[queued.idempotency_key] = queued
                pending = len(self._outbox)
            event(
                logging.WARNING,
                "billing_fail_open_charge_queued",
                oauth_provider=oauth_provider,
                external_id=external_id,
                uses=uses,
                idempotency_key=queued.idempotency_key,
                pending=pending,
                unreachable_for=round(self.unreachable_for or 0.0, 3),
                grace_seconds=self.fail_open_grace_seconds,
                error=exc.detail,
            )
            return queued.as_charge()
        made = parse_charge(
            response_json(response),
            request.idempotency_key,
            replayed=response.headers.get("Idempotent-Replayed") == "true",
        )
        self._keep_next_check(made)
        return made

    def _keep_next_check(self, made: Charge) -> None:
        """Keep what the user's next check would answer, when it says they may go on (a stale
        "yes" costs at most a charge refused with 402 and the check's answer then; a stale "no"
        would stop a user who just bought, so a "no" is always asked again)."""
        if self.check_reuse_seconds == 0 or made.next_check is None:
            return
        who = (made.oauth_provider, made.external_id)
        with self._lock:
            self._next_checks.pop(who, None)
            if made.next_check.has_credit:
                self._next_checks[who] = (made.next_check, self._clock())
                while len(self._next_checks) > MAX_NEXT_CHECKS:
                    self._next_checks.popitem(last=False)

    def _next_check(self, oauth_provider: str, external_id: str) -> CreditCheck | None:
        """The check a charge answered for this user, once, while fresh."""
        if self.check_reuse_seconds == 0:
            return None
        with self._lock:
            kept = self._next_checks.pop((oauth_provider, external_id), None)
        if kept is None or self._clock() - kept[1] >= self.check_reuse_seconds:
            return None
        return kept[0]

    def purchase(
        self,
        oauth_provider: str,
        external_id: str,
        customer_email: str | None = None,
        idempotency_key: str | None = None,
        *,
        pack_id: str | None = None,
        promotion_code: str | None = None,
    ) -> Program[Purchase]:
        key = new_idempotency_key() if idempotency_key is None else idempotency_key
        body: dict[str, Any] = {"oauth_provider": oauth_provider, "external_id": external_id}
        if customer_email is not None:
            body["customer_email"] = customer_email
        # The catalog: which pack (default: the server's default pack), and a promotion code.
        if pack_id is not None:
            body["pack_id"] = pack_id
        if promotion_code is not None:
            body["promotion_code"] = promotion_code
        call = Call("POST", PURCHASES_PATH, body=body, idempotency_key=key)
        response = yield from self.call(call)
        return parse_purchase(response_json(response), idempotency_key=key)

    def purchase_status(self, payment_id: str) -> Program[Purchase]:
        path = f"{PURCHASES_PATH}/{quote(payment_id, safe='')}"
        response = yield from self.call(Call("GET", path))
        return parse_purchase(response_json(response))

    def confirm_purchase(self, payment_id: str) -> Program[Purchase]:
        # Safe to repeat: the service asks the provider and credits a paid purchase once.
        path = f"{PURCHASES_PATH}/{quote(payment_id, safe='')}/sync"
        response = yield from self.call(Call("POST", path))
        return parse_purchase(response_json(response))

    def transactions(
        self, oauth_provider: str, external_id: str, limit: int = 50, offset: int = 0
    ) -> Program[TransactionPage]:
        params: dict[str, str | int] = {
            "oauth_provider": oauth_provider,
            "external_id": external_id,
            "limit": limit,
            "offset": offset,
        }
        response = yield from self.call(Call("GET", TRANSACTIONS_PATH, params=params))
        return parse_transactions(response_json(response))

    def lots(
        self, oauth_provider: str, external_id: str, include: str = "active"
    ) -> Program[tuple[Lot, ...]]:
        path = (
            f"{ACCOUNTS_PATH}/{quote(oauth_provider, safe='')}/{quote(external_id, safe='')}/lots"
        )
        response = yield from self.call(Call("GET", path, params={"include": include}))
        return parse_lots(response_json(response))

    # -- reservations (holds) ---------------------------------------------------------
    # Always fail closed: a hold is the service's promise, which no client can make for it.

    def reserve(
        self,
        oauth_provider: str,
        external_id: str,
        *,
        uses: int = 1,
        ttl_seconds: int = 300,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        feature: str | None = None,
        quantity: int | None = None,
    ) -> Program[Reservation]:
        if (feature is None) != (quantity is None):
            raise ValueError("feature and quantity go together")
        key = new_idempotency_key() if idempotency_key is None else idempotency_key
        body: dict[str, Any] = {
            "oauth_provider": oauth_provider,
            "external_id": external_id,
            "ttl_seconds": ttl_seconds,
            "metadata": dict(metadata or {}),
        }
        # A hold by a feature's quantity (the rate makes it uses), or of uses.
        body |= {"uses": uses} if feature is None else {"feature": feature, "quantity": quantity}
        # Safe to retry: every attempt carries `key`, so a hold made by an attempt whose answer
        # was lost is replayed, never made twice.
        call = Call("POST", RESERVATIONS_PATH, body=body, idempotency_key=key)
        response = yield from self.call(call)
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        return parse_reservation(response_json(response), key, replayed)

    def capture(
        self,
        reservation_id: str,
        *,
        uses: int | None = None,
        amount_minor: int = 0,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        quantity: int | None = None,
    ) -> Program[Charge]:
        key = new_idempotency_key() if idempotency_key is None else idempotency_key
        body: dict[str, Any] = {
            "uses": uses,
            "amount_minor": amount_minor,
            "description": description,
            "metadata": dict(metadata or {}),
        }
        if quantity is not None:  # a hold by a `carry` feature: the units the work used
            body["quantity"] = quantity
        path = f"{RESERVATIONS_PATH}/{quote(reservation_id, safe='')}/capture"
        # Safe to retry: the same key on every attempt; the service replays the one charge.
        response = yield from self.call(Call("POST", path, body=body, idempotency_key=key))
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        return parse_charge(response_json(response), key, replayed)

    def release(self, reservation_id: str) -> Program[Reservation]:
        # Safe to retry without a key: releasing a released (or expired) hold answers it as is.
        path = f"{RESERVATIONS_PATH}/{quote(reservation_id, safe='')}/release"
        response = yield from self.call(Call("POST", path))
        return parse_reservation(response_json(response))

    def reservation(self, reservation_id: str) -> Program[Reservation]:
        path = f"{RESERVATIONS_PATH}/{quote(reservation_id, safe='')}"
        response = yield from self.call(Call("GET", path))
        return parse_reservation(response_json(response))

    def reservations(
        self,
        oauth_provider: str | None = None,
        external_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> Program[ReservationPage]:
        params: dict[str, str | int] = {"limit": limit, "offset": offset}
        if oauth_provider is not None:
            params["oauth_provider"] = oauth_provider
        if external_id is not None:
            params["external_id"] = external_id
        if status is not None:
            params["status"] = status
        response = yield from self.call(Call("GET", RESERVATIONS_PATH, params=params))
        return parse_reservations(response_json(response))

    # -- the outbox --------------------------------------------------------------------

    def flush(self, max_retries: int | None = None) -> Program[FlushReport]:
        """Send the queued charges, oldest first, each under its own idempotency key (so each is
        recorded exactly once, however often this runs). Stops at the first unavailability.
        A charge the service refuses for good (402, 404, 409, 422, suspended) is dropped and
        logged; one refused for our key (401/403) stays queued."""
        with self._lock:
            batch = [c for k, c in self._outbox.items() if k not in self._in_flight]
            self._in_flight.update(c.idempotency_key for c in batch)
        recorded: list[Charge] = []
        dropped: list[DroppedCharge] = []
        stopped: BillingError | None = None
        try:
            for queued in batch:
                try:
                    response = yield from self.exchange(charge_call(queued), max_retries)
                except BillingError as exc:
                    stopped = exc
                    break
                if response.is_success:
                    self._settle(queued)
                    recorded.append(self._flushed_charge(queued, response))
                    event(
                        logging.INFO,
                        "billing_pending_charge_recorded",
                        idempotency_key=queued.idempotency_key,
                        replayed=recorded[-1].replayed,
                        queued_for=round(time.time() - queued.queued_at, 3),
                    )
                    continue
                error = error_for(response)
                if response.status_code >= 500 or isinstance(error, AuthenticationError):
                    stopped = error
                    break
                self._settle(queued)
                dropped.append(DroppedCharge(queued, error))
                event(
                    logging.ERROR,
                    "billing_pending_charge_dropped",
                    oauth_provider=queued.oauth_provider,
                    external_id=queued.external_id,
                    uses=queued.uses,
                    idempotency_key=queued.idempotency_key,
                    error=error.code,
                    detail=error.detail,
                )
        finally:
            with self._lock:
                self._in_flight.difference_update(c.idempotency_key for c in batch)
        if stopped is not None:
            event(
                logging.WARNING, "billing_flush_stopped", error=stopped.code, detail=stopped.detail
            )
        return FlushReport(
            recorded=tuple(recorded),
            dropped=tuple(dropped),
            remaining=len(self._outbox),
            error=stopped,
        )

    def _settle(self, queued: PendingCharge) -> None:
        with self._lock:
            self._outbox.pop(queued.idempotency_key, None)

    @staticmethod
    def _flushed_charge(queued: PendingCharge, response: httpx.Response) -> Charge:
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        try:
            return parse_charge(response_json(response), queued.idempotency_key, replayed)
        except BillingError:  # recorded all the same; only its details are unreadable
            return replace(queued.as_charge(), pending=False, replayed=replayed)

    def close(self) -> Program[None]:
        """Before the connection pool closes: a last flush; log what could not be sent."""
        if not self._outbox:
            return
        report = yield from self.flush()
        if report.remaining:
            event(
                logging.ERROR,
                "billing_pending_charges_lost",
                count=report.remaining,
                idempotency_keys=",".join(c.idempotency_key for c in self.pending_charges),
            )

    def _fail_closed(
        self, what: str, oauth_provider: str, external_id: str, error: BillingUnavailableError
    ) -> None:
        event(
            logging.WARNING,
            "billing_fail_closed",
            call=what,
            oauth_provider=oauth_provider,
            external_id=external_id,
            unreachable_for=round(self.unreachable_for or 0.0, 3),
            grace_seconds=self.fail_open_grace_seconds,
            error=error.detail,
        )


@dataclass(frozen=True, slots=True)
class CaptureAsked:
    uses: int | None
    amount_minor: int
    description: str | None
    metadata: Mapping[str, Any]
    quantity: int | None = None  # a hold by a `carry` feature's: the units used


class HoldState:
    """One `reserve()` block: its hold, what the block did with it, and what its exit does.

    Used by the block's own task or thread only, so it needs no lock. Both keys are made once,
    here: every send of the reserve (the client's retries) carries `idempotency_key`, and every
    send of the capture (retries, a second `capture()`, the exit's) carries `capture_key`, so
    the service makes one hold and at most one charge however often either is sent.
    """

    def __init__(
        self,
        core: ClientCore,
        oauth_provider: str,
        external_id: str,
        *,
        uses: int,
        ttl_seconds: int,
        metadata: Mapping[str, Any] | None,
        idempotency_key: str | None,
        feature: str | None = None,
        quantity: int | None = None,
    ) -> None:
        self.core = core
        self.oauth_provider = oauth_provider
        self.external_id = external_id
        self.uses = uses
        self.feature = feature
        self.quantity = quantity
        self.ttl_seconds = ttl_seconds
        self.metadata = dict(metadata or {})
        self.idempotency_key = new_idempotency_key() if idempotency_key is None else idempotency_key
        self.capture_key = new_idempotency_key()
        self._reservation: Reservation | None = None
        self.charge: Charge | None = None
        self.released: Reservation | None = None
        # A capture was sent and its outcome is unknown (no definite answer came back).
        self.unsettled: CaptureAsked | None = None

    @property
    def reservation(self) -> Reservation:
        if self._reservation is None:
            raise RuntimeError("the hold is made on entering the `with` block of reserve()")
        return self._reservation

    @property
    def status(self) -> str:
        if self._reservation is None:
            return "new"
        if self.charge is not None:
            return "captured"
        if self.released is not None:
            return self.released.status  # released, or expired
        return "held"

    def enter(self) -> Program[Reservation]:
        if self._reservation is not None:
            raise RuntimeError("a reserve() block can be entered once")
        self._reservation = yield from self.core.reserve(
            self.oauth_provider,
            self.external_id,
            uses=self.uses,
            ttl_seconds=self.ttl_seconds,
            metadata=self.metadata,
            idempotency_key=self.idempotency_key,
            feature=self.feature,
            quantity=self.quantity,
        )
        event(
            logging.INFO,
            "billing_hold_made",
            reservation_id=self._reservation.reservation_id,
            uses=self.uses,
            expires_at=self._reservation.expires_at,
        )
        return self._reservation

    def capture(self, asked: CaptureAsked) -> Program[Charge]:
        reservation_id = self.reservation.reservation_id
        self.unsettled = asked
        try:
            charge = yield from self.core.capture(
                reservation_id,
                uses=asked.uses,
                amount_minor=asked.amount_minor,
                description=asked.description,
                metadata=asked.metadata,
                idempotency_key=self.capture_key,
                quantity=asked.quantity,
            )
        except BillingError as exc:
            if 400 <= (exc.status or 0) < 500 and exc.status != 429:
                self.unsettled = None  # a definite refusal: nothing was charged
            raise
        self.unsettled = None
        self.charge = charge
        return charge

    def release(self) -> Program[Reservation]:
        released = yield from self.core.release(self.reservation.reservation_id)
        self.released = released
        return released

    def exit(self, raised: bool) -> Program[None]:
        """Captured or released already: nothing. A normal exit after a capture whose answer
        was lost sends it again (same key: charged once). Else release; a failed release is
        logged, not raised (the service releases the hold by itself at `expires_at`)."""
        if self._reservation is None or self.charge is not None or self.released is not None:
            return
        if not raised and self.unsettled is not None:
            yield from self.capture(self.unsettled)
            return
        try:
            yield from self.release()
        except BillingError as exc:
            event(
                logging.WARNING,
                "billing_hold_release_failed",
                reservation_id=self._reservation.reservation_id,
                error=exc.code,
                detail=exc.detail,
                expires_at=self._reservation.expires_at,
            )
            return
        event(
            logging.INFO,
            "billing_hold_released",
            reservation_id=self._reservation.reservation_id,
            because="exception" if raised else "not_captured",
        )
