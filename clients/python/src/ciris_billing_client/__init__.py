"""Python client for the CIRIS Billing API, for agents: `AsyncBillingClient` and `BillingClient`.

Its own distribution (`pip install ciris-billing-client`; only `httpx` is needed), imported as
`ciris_billing_client`; the server package re-exports it as `ciris_billing.client`.

    async with AsyncBillingClient("http://127.0.0.1:8000", api_key) as billing:
        if (await billing.check("oauth:google", user_id)).has_credit:
            answer = await do_the_work()
            await billing.charge("oauth:google", user_id, description="chat turn")

Both clients share one implementation (`_core`); the sync one only does blocking I/O.

**Holds** (reserve before, capture after), for work whose cost is known only at its end:

    async with billing.reserve("oauth:google", user_id, uses=5, ttl=120) as hold:
        steps = await run_the_agent()
        await hold.capture(steps)        # one charge for `steps` uses; the rest go back

An exception in the block releases the hold; a normal exit releases it unless `capture()` was
called. `BillingClient.reserve` is the same, with `with` and `hold.capture(steps)`.

**Results** are frozen dataclasses (`CreditCheck`, `Charge`, `Purchase`, `TransactionPage`,
`Reservation`); fields the client does not know yet are ignored (and kept in `.raw`).

**Idempotency**: every charge, purchase, reserve and capture carries an `Idempotency-Key` (a
uuid4 unless you pass `idempotency_key=`), the same on every retry of that call, so a retry
after a lost response replays the first answer instead of charging twice (`Charge.replayed`).

**Retries**: connection errors, timeouts, 502/503/504, 429, and 500 (every call the client
makes is idempotent) are retried up to `max_retries` times, with exponential backoff
(`backoff` * 2^n, capped at `max_backoff`) and jitter; `Retry-After` on 429/503 is honoured
(a wait longer than `max_backoff` ends the retries). 4xx answers are never retried.

**Errors**: `BillingError` (`status`, `code`, `detail`, `body`) and its subclasses
`PurchaseRequiredError` (402; `offer`, `checkout_url`), `AuthenticationError` (401/403),
`AccountSuspendedError`, `NotFoundError` (404), `IdempotencyConflictError` (409),
`ReservationExpiredError` and `ReservationNotHeldError` (409 on a hold), and
`BillingUnavailableError` (retries exhausted: billing is unreachable).

**When billing is unreachable** (retries exhausted on connection errors, timeouts or 5xx):

- By default the client **fails closed**: `check` and `charge` raise `BillingUnavailableError`,
  and the agent should not serve unbilled work.
- With `fail_open_grace_seconds=N` it **fails open for N seconds**, counted from the first
  failed request of the outage: `check` returns `CreditCheck(has_credit=True, degraded=True)`
  (counts None) and `charge` puts the charge, with its idempotency key, in an in-memory outbox
  and returns `Charge(pending=True)`. Each decision is logged on the `ciris_billing.client`
  logger (WARNING, events `billing_fail_open_check`, `billing_fail_open_charge_queued`;
  `billing_fail_closed` when it refuses). Once N seconds have passed without a successful
  call it fails closed again. Queued charges are sent, under their own idempotency keys (so
  each is recorded exactly once however often they are sent), after the next successful
  call, by `flush_pending()`, and on `close()`/`aclose()`. A queued charge the service
  refuses for good when flushed (e.g. 402: the user had no use left) is dropped and logged
  (`billing_pending_charge_dropped`, ERROR). The outbox lives in memory: charges still queued
  when the process dies are lost (`pending_charges` lets you persist them yourself).

purchase, purchase_status, transactions and holds always fail closed.
"""

from ciris_billing_client._shells import AsyncBillingClient, AsyncHold, BillingClient, Hold
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
    ReservationStateError,
)
from ciris_billing_client.models import (
    Charge,
    CreditCheck,
    DroppedCharge,
    FlushReport,
    Lot,
    LotUse,
    NextExpiry,
    PendingCharge,
    Purchase,
    Reservation,
    ReservationPage,
    Transaction,
    TransactionPage,
)

__all__ = [
    "AccountSuspendedError",
    "AsyncBillingClient",
    "AsyncHold",
    "AuthenticationError",
    "BillingClient",
    "BillingError",
    "BillingUnavailableError",
    "Charge",
    "CreditCheck",
    "DroppedCharge",
    "FlushReport",
    "Hold",
    "IdempotencyConflictError",
    "Lot",
    "LotUse",
    "NextExpiry",
    "NotFoundError",
    "Offer",
    "PendingCharge",
    "Purchase",
    "PurchaseRequiredError",
    "Reservation",
    "ReservationExpiredError",
    "ReservationNotHeldError",
    "ReservationPage",
    "ReservationStateError",
    "Transaction",
    "TransactionPage",
    "__version__",
]
