"""The installation's "now": the real UTC time plus the test clock's offset (issue 23 item 8).

Every time rule of the business reads its time here: hold TTLs and their expiry job, link
lifetimes (buy, portal, console confirmations and sessions), idempotency and audit timestamps,
the auto top-up monthly cap, event timestamps, ledger, charge and credit times, the jobs that
compare with now (reconciliation, hold expiry, retries due). `db.utcnow` is this `now`. SQL
never uses the database's own `now()` for a time rule: the time is passed as a parameter.

The offset is 0 unless the active payment provider is the sandbox and an operator advanced the
test clock (testclock/: `POST /v1/billing/test_clock/advance`, `ciris-billing test-clock
advance`), so a developer sees next month without waiting. It only ever moves forward.

Wall-clock time, on purpose (not business time, `wall_now()` or their own timers): rate-limit
windows and the API-key cache (monotonic), HTTP and database timeouts, retry sleeps, the
`webhook-timestamp` of our signed deliveries and the Stripe-Signature tolerance (each checked
against the other side's real clock), the sandbox provider's own event `created` (the
provider's clock, as Stripe's), log timestamps, and procrastinate's job scheduling.

Multi-process: the offset lives in the database (table `test_clock`, one row; none = 0), and
each process (every `serve` worker, the `worker`, a CLI command) keeps a copy in this module.
Long-running processes re-read it every REFRESH_SECONDS in sandbox mode only
(testclock/store.py `following`); the advance answers only after SETTLE_SECONDS, three refresh
periods, so when it answers every process has seen it. Chosen over LISTEN/NOTIFY: no
connection held per process (PostgreSQL has 100), nothing lost when a connection drops, and a
read of one row twice a second is nothing beside a request. The hot path reads a module global
and adds it: no database read per request; with Stripe nothing refreshes and the offset stays 0.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

# How often a long-running process re-reads the offset (sandbox mode only).
REFRESH_SECONDS = 0.5
# How long an advance waits, after it committed, before it answers: by then every process
# has re-read the offset (a refresh in flight, one period, and room for a busy event loop).
SETTLE_SECONDS = 3 * REFRESH_SECONDS

_ZERO = timedelta(0)
_offset = _ZERO
_offset_seconds = 0


def now() -> datetime:
    """The installation's time: aware UTC, the real time plus the test clock's offset."""
    moment = datetime.now(UTC)
    return moment + _offset if _offset_seconds else moment


def timestamp() -> float:
    """`now()` as Unix seconds (the links' expiries)."""
    return time.time() + _offset_seconds


def wall_now() -> datetime:
    """The real time, for what is checked against someone else's clock (signatures)."""
    return datetime.now(UTC)


def offset_seconds() -> int:
    """How far this process's clock is ahead of the real time."""
    return _offset_seconds


def set_offset(seconds: int) -> None:
    """This process's copy of the offset (testclock/store.py keeps it in step)."""
    global _offset, _offset_seconds
    _offset_seconds = int(seconds)
    _offset = timedelta(seconds=_offset_seconds)
