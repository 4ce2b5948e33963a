"""The test clock's offset in the database, and each process's copy kept in step with it.

The offset is one row (`test_clock`; none = 0), written only by `advance` in sandbox mode and
read by every process: once by a one-shot CLI command (`load`), and every clock.REFRESH_SECONDS
by a long-running one (`following`: each `serve` worker, the `worker`). Outside sandbox mode
nothing is read and the offset stays 0 (clock.py's docstring: why polling).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing import audit_trail, clock
from ciris_billing.audit_trail import Entry, Operator
from ciris_billing.config import Settings
from ciris_billing.db import iso, test_clock
from ciris_billing.errors import InvalidRequest, SandboxInactive
from ciris_billing.observability import log

YEAR_SECONDS = 366 * 86_400
# One advance: at most 10 years; the clock as a whole: at most 100 years ahead (dates stay
# far from datetime's year 9999 whatever is added to them).
MAX_ADVANCE_SECONDS = 10 * YEAR_SECONDS
MAX_OFFSET_SECONDS = 100 * YEAR_SECONDS


def is_sandbox(settings: Settings) -> bool:
    return settings.active_payment_provider == "sandbox"


def require_sandbox(settings: Settings) -> None:
    """SandboxInactive (404 `sandbox_inactive`) unless the sandbox provider is active."""
    if not is_sandbox(settings):
        raise SandboxInactive(
            "The test clock exists only with the sandbox provider (PAYMENT_PROVIDER=stripe)"
        )


async def read_offset(conn: AsyncConnection) -> int:
    value = await conn.scalar(select(test_clock.c.offset_seconds).where(test_clock.c.id == 1))
    return int(value or 0)


async def load(engine: AsyncEngine, settings: Settings) -> None:
    """A one-shot process (a CLI command): this process's offset, read once (sandbox only)."""
    if not is_sandbox(settings):
        clock.set_offset(0)
        return
    async with engine.connect() as conn:
        clock.set_offset(await read_offset(conn))


@contextlib.asynccontextmanager
async def following(engine: AsyncEngine, settings: Settings) -> AsyncIterator[None]:
    """A long-running process: the offset read now, then again every REFRESH_SECONDS until the
    block ends (sandbox only; with Stripe nothing runs and the offset stays 0)."""
    await load(engine, settings)
    if not is_sandbox(settings):
        yield
        return
    task = asyncio.create_task(_refresh(engine), name="test-clock-refresh")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        clock.set_offset(0)  # this process's clock no longer follows any installation


async def _refresh(engine: AsyncEngine) -> None:
    while True:
        await asyncio.sleep(clock.REFRESH_SECONDS)
        try:
            async with engine.connect() as conn:
                clock.set_offset(await read_offset(conn))
        except Exception as exc:  # the database away: the last offset stays, next period
            log.warning("test_clock_refresh_failed", error=type(exc).__name__)


@dataclass(frozen=True, slots=True)
class Clock:
    offset_seconds: int

    def body(self) -> dict[str, object]:
        """The API's answer: the installation's now at this offset (RFC 3339, UTC)."""
        now = clock.wall_now() + timedelta(seconds=self.offset_seconds)
        return {"now": iso(now), "offset_seconds": self.offset_seconds, "sandbox": True}


async def current(conn: AsyncConnection) -> Clock:
    return Clock(await read_offset(conn))


async def advance(conn: AsyncConnection, operator: Operator, seconds: int) -> Clock:
    """Move the installation's clock `seconds` forward, audited, in the caller's transaction.
    Other processes see it within clock.SETTLE_SECONDS of the commit."""
    if not 1 <= seconds <= MAX_ADVANCE_SECONDS:
        raise InvalidRequest(f"seconds must be between 1 and {MAX_ADVANCE_SECONDS}")
    at = clock.wall_now()
    # Safe when two advances race: the one row's upsert serializes them (ON CONFLICT waits for
    # the other's commit, then adds to what it wrote): both seconds count, nothing is lost.
    added = await conn.scalar(
        pg_insert(test_clock)
        .values(id=1, offset_seconds=seconds, updated_at=at)
        .on_conflict_do_update(
            index_elements=["id"],
            set_={"offset_seconds": test_clock.c.offset_seconds + seconds, "updated_at": at},
            where=test_clock.c.offset_seconds + seconds <= MAX_OFFSET_SECONDS,
        )
        .returning(test_clock.c.offset_seconds)
    )
    if added is None:
        raise InvalidRequest(f"The test clock goes at most {MAX_OFFSET_SECONDS} seconds ahead")
    after = Clock(int(added))
    before = Clock(after.offset_seconds - seconds)
    entry = Entry(
        "test_clock_advance",
        None,
        None,
        {"seconds": seconds},
        {"offset_seconds": before.offset_seconds},
        {"offset_seconds": after.offset_seconds},
    )
    await audit_trail.record_action(conn, operator, entry)
    log.info("test_clock_advanced", seconds=seconds, offset_seconds=after.offset_seconds)
    return after
