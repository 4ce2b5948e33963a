"""The sync and async clients: thin shells that run the core's programs over httpx."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ciris_billing_client._core import (
    CaptureAsked,
    ClientCore,
    HoldState,
    Program,
    Reply,
    Sleep,
)
from ciris_billing_client.models import (
    Charge,
    CreditCheck,
    FlushReport,
    Lot,
    PendingCharge,
    Purchase,
    Reservation,
    ReservationPage,
    TransactionPage,
)

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF = 0.25
DEFAULT_MAX_BACKOFF = 10.0
DEFAULT_HOLD_TTL = 300
# A charge's answer carries the next credit check's (`Prefer: next-check`): the client answers
# the user's next check from it for this long (0: always ask the service).
DEFAULT_CHECK_REUSE_SECONDS = 2.0


class _HoldView:
    """What a `reserve()` block's hold looks like; `Hold` and `AsyncHold` add the calls."""

    _state: HoldState

    @property
    def reservation(self) -> Reservation:
        """The hold as the service made it (the counts are those of that moment)."""
        return self._state.reservation

    @property
    def reservation_id(self) -> str:
        return self.reservation.reservation_id

    @property
    def uses(self) -> int:
        """The uses held."""
        return self.reservation.uses

    @property
    def expires_at(self) -> str:
        """ISO 8601 (UTC): past it the hold cannot be captured and is released by itself."""
        return self.reservation.expires_at

    @property
    def held_uses(self) -> int:
        """Uses held by all the account's active holds (this one included) when it was made."""
        return self.reservation.held_uses

    @property
    def free_uses_remaining(self) -> int:
        return self.reservation.free_uses_remaining

    @property
    def credits_remaining(self) -> int:
        return self.reservation.credits_remaining

    @property
    def status(self) -> str:
        """As this client knows it: new, held, captured, released (or expired)."""
        return self._state.status

    @property
    def charge(self) -> Charge | None:
        """The capture's charge, once captured."""
        return self._state.charge

    @property
    def idempotency_key(self) -> str:
        """The reserve's key (sent on each of its retries)."""
        return self._state.idempotency_key

    @property
    def capture_key(self) -> str:
        """The capture's key (sent on each send of the capture)."""
        return self._state.capture_key

    def __repr__(self) -> str:
        made = self._state._reservation
        rid = made.reservation_id if made is not None else None
        return f"<{type(self).__name__} {rid} uses={self._state.uses} status={self.status}>"


class Hold(_HoldView):
    """`with billing.reserve(...) as hold:` — see `BillingClient.reserve`."""

    def __init__(self, client: BillingClient, state: HoldState) -> None:
        self._client = client
        self._state = state

    def capture(
        self,
        uses: int | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        amount_minor: int = 0,
        quantity: int | None = None,
    ) -> Charge:
        """Charge `uses` (at most the held ones; all when None) as one charge; the rest go back.
        A hold by a `carry` feature is captured by `quantity` (the units the work used; all the
        held ones when None). Raises ReservationExpiredError past `expires_at`."""
        asked = CaptureAsked(uses, amount_minor, description, dict(metadata or {}), quantity)
        return self._client._run(self._state.capture(asked))

    def release(self) -> Reservation:
        """Give all the held uses back now (idempotent)."""
        return self._client._run(self._state.release())

    def __enter__(self) -> Hold:
        self._client._run(self._state.enter())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._client._run(self._state.exit(raised=exc_type is not None))


class AsyncHold(_HoldView):
    """`async with billing.reserve(...) as hold:` — see `AsyncBillingClient.reserve`."""

    def __init__(self, client: AsyncBillingClient, state: HoldState) -> None:
        self._client = client
        self._state = state

    async def capture(
        self,
        uses: int | None = None,
        description: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        amount_minor: int = 0,
        quantity: int | None = None,
    ) -> Charge:
        """Charge `uses` (at most the held ones; all when None) as one charge; the rest go back.
        A hold by a `carry` feature is captured by `quantity` (the units the work used; all the
        held ones when None). Raises ReservationExpiredError past `expires_at`."""
        asked = CaptureAsked(uses, amount_minor, description, dict(metadata or {}), quantity)
        return await self._client._run(self._state.capture(asked))

    async def release(self) -> Reservation:
        """Give all the held uses back now (idempotent)."""
        return await self._client._run(self._state.release())

    async def __aenter__(self) -> AsyncHold:
        await self._client._run(self._state.enter())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._client._run(self._state.exit(raised=exc_type is not None))


class _ClientBase:
    _core: ClientCore

    @property
    def pending_charges(self) -> tuple[PendingCharge, ...]:
        """Charges accepted while billing was unreachable (fail-open), not yet recorded."""
        return self._core.pending_charges

    @property
    def unreachable_for(self) -> float | None:
        """Seconds since billing first failed in the current outage; None while it answers."""
        return self._core.unreachable_for


class BillingClient(_ClientBase):
    """Blocking client for the CIRIS Billing API; see `ciris_billing_client` for the policy.

    Use it as a context manager, or call `close()`. Safe to share between threads.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        fail_open_grace_seconds: float | None = None,
        transport: httpx.BaseTransport | None = None,
        check_reuse_seconds: float = DEFAULT_CHECK_REUSE_SECONDS,
    ) -> None:
        self._core = ClientCore(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            fail_open_grace_seconds=fail_open_grace_seconds,
            check_reuse_seconds=check_reuse_seconds,
        )
        self._http = httpx.Client(transport=transport)

    def _run(self, program: Program[T]) -> T:
        try:
            step = next(program)
            while True:
                reply: Reply = None
                if isinstance(step, Sleep):
                    time.sleep(step.seconds)
                else:
                    try:
                        reply = self._http.send(step)
                    except httpx.TransportError as exc:
                        reply = exc
                step = program.send(reply)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            program.close()

    def check(
        self,
        oauth_provider: str,
        external_id: str,
        context: Mapping[str, Any] | None = None,
        *,
        customer_email: str | None = None,
    ) -> CreditCheck:
        """May this user go on? (Creates the account with its free uses on first sight.)"""
        return self._run(self._core.check(oauth_provider, external_id, context, customer_email))

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
    ) -> Charge:
        """Record `uses` uses, or `quantity` units of `feature` (the service's rate for it
        makes them uses). Raises PurchaseRequiredError (402) when none is left."""
        return self._run(
            self._core.charge(
                oauth_provider,
                external_id,
                uses=uses,
                amount_minor=amount_minor,
                currency=currency,
                description=description,
                metadata=metadata,
                idempotency_key=idempotency_key,
                feature=feature,
                quantity=quantity,
            )
        )

    def purchase(
        self,
        oauth_provider: str,
        external_id: str,
        customer_email: str | None = None,
        idempotency_key: str | None = None,
        *,
        pack_id: str | None = None,
        promotion_code: str | None = None,
    ) -> Purchase:
        """Start buying uses (`pack_id`: a pack of GET /v1/billing/packs, default the default
        pack; `promotion_code`: charged the discount); pay with `checkout_url` or
        `client_secret`."""
        return self._run(
            self._core.purchase(
                oauth_provider,
                external_id,
                customer_email,
                idempotency_key,
                pack_id=pack_id,
                promotion_code=promotion_code,
            )
        )

    def purchase_status(self, payment_id: str) -> Purchase:
        """A purchase's current state (`succeeded` once its uses are credited)."""
        return self._run(self._core.purchase_status(payment_id))

    def confirm_purchase(self, payment_id: str) -> Purchase:
        """Once the provider told the payer it succeeded: the service asks the provider and
        credits the purchase now (once, as its webhook would); the purchase after it."""
        return self._run(self._core.confirm_purchase(payment_id))

    def transactions(
        self, oauth_provider: str, external_id: str, limit: int = 50, offset: int = 0
    ) -> TransactionPage:
        """A page of the account's ledger, newest first."""
        return self._run(self._core.transactions(oauth_provider, external_id, limit, offset))

    def lots(
        self, oauth_provider: str, external_id: str, include: str = "active"
    ) -> tuple[Lot, ...]:
        """The account's lots: open ones in the order uses are taken from them (then, with
        include="expired" or "all", the closed ones, newest first)."""
        return self._run(self._core.lots(oauth_provider, external_id, include))

    def reserve(
        self,
        oauth_provider: str,
        external_id: str,
        *,
        uses: int = 1,
        ttl: int = DEFAULT_HOLD_TTL,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        feature: str | None = None,
        quantity: int | None = None,
    ) -> Hold:
        """Hold `uses` uses for `ttl` seconds, for work whose cost is known only at its end:

            with billing.reserve("oauth:google", user_id, uses=5, ttl=120) as hold:
                steps = run_the_agent()
                hold.capture(steps)

        Entering makes the hold (PurchaseRequiredError when fewer uses are available). An
        exception in the block releases it; a normal exit releases it unless `capture()` was
        called. Past `ttl` the service releases it by itself. By a feature's rate instead of
        uses: `reserve(..., feature="gpt-4o-tokens", quantity=4000)`, then
        `hold.capture(quantity=used)` for a `carry` rate.
        """
        return Hold(
            self,
            HoldState(
                self._core,
                oauth_provider,
                external_id,
                uses=uses,
                ttl_seconds=ttl,
                metadata=metadata,
                idempotency_key=idempotency_key,
                feature=feature,
                quantity=quantity,
            ),
        )

    def reservation(self, reservation_id: str) -> Reservation:
        """One hold as the service has it now."""
        return self._run(self._core.reservation(reservation_id))

    def reservations(
        self,
        oauth_provider: str | None = None,
        external_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> ReservationPage:
        """Holds, newest first: of one identity, and/or in one status."""
        return self._run(
            self._core.reservations(oauth_provider, external_id, status, limit, offset)
        )

    def flush_pending(self) -> FlushReport:
        """Record the charges queued while billing was unreachable (exactly once each)."""
        return self._run(self._core.flush())

    def close(self) -> None:
        """Flush pending charges (best effort; what is left is logged), then close."""
        try:
            self._run(self._core.close())
        finally:
            self._http.close()

    def __enter__(self) -> BillingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncBillingClient(_ClientBase):
    """Asyncio client for the CIRIS Billing API; see `ciris_billing_client` for the policy.

    Use it as an async context manager, or await `aclose()`. One instance per event loop.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        fail_open_grace_seconds: float | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        check_reuse_seconds: float = DEFAULT_CHECK_REUSE_SECONDS,
    ) -> None:
        self._core = ClientCore(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            fail_open_grace_seconds=fail_open_grace_seconds,
            check_reuse_seconds=check_reuse_seconds,
        )
        self._http = httpx.AsyncClient(transport=transport)

    async def _run(self, program: Program[T]) -> T:
        try:
            step = next(program)
            while True:
                reply: Reply = None
                if isinstance(step, Sleep):
                    await asyncio.sleep(step.seconds)
                else:
                    try:
                        reply = await self._http.send(step)
                    except httpx.TransportError as exc:
                        reply = exc
                step = program.send(reply)
        except StopIteration as stop:
            result: T = stop.value
            return result
        finally:
            program.close()

    async def check(
        self,
        oauth_provider: str,
        external_id: str,
        context: Mapping[str, Any] | None = None,
        *,
        customer_email: str | None = None,
    ) -> CreditCheck:
        """May this user go on? (Creates the account with its free uses on first sight.)"""
        return await self._run(
            self._core.check(oauth_provider, external_id, context, customer_email)
        )

    async def charge(
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
    ) -> Charge:
        """Record `uses` uses, or `quantity` units of `feature` (the service's rate for it
        makes them uses). Raises PurchaseRequiredError (402) when none is left."""
        return await self._run(
            self._core.charge(
                oauth_provider,
                external_id,
                uses=uses,
                amount_minor=amount_minor,
                currency=currency,
                description=description,
                metadata=metadata,
                idempotency_key=idempotency_key,
                feature=feature,
                quantity=quantity,
            )
        )

    async def purchase(
        self,
        oauth_provider: str,
        external_id: str,
        customer_email: str | None = None,
        idempotency_key: str | None = None,
        *,
        pack_id: str | None = None,
        promotion_code: str | None = None,
    ) -> Purchase:
        """Start buying uses (`pack_id`: a pack of GET /v1/billing/packs, default the default
        pack; `promotion_code`: charged the discount); pay with `checkout_url` or
        `client_secret`."""
        return await self._run(
            self._core.purchase(
                oauth_provider,
                external_id,
                customer_email,
                idempotency_key,
                pack_id=pack_id,
                promotion_code=promotion_code,
            )
        )

    async def purchase_status(self, payment_id: str) -> Purchase:
        """A purchase's current state (`succeeded` once its uses are credited)."""
        return await self._run(self._core.purchase_status(payment_id))

    async def confirm_purchase(self, payment_id: str) -> Purchase:
        """Once the provider told the payer it succeeded: the service asks the provider and
        credits the purchase now (once, as its webhook would); the purchase after it."""
        return await self._run(self._core.confirm_purchase(payment_id))

    async def transactions(
        self, oauth_provider: str, external_id: str, limit: int = 50, offset: int = 0
    ) -> TransactionPage:
        """A page of the account's ledger, newest first."""
        return await self._run(self._core.transactions(oauth_provider, external_id, limit, offset))

    async def lots(
        self, oauth_provider: str, external_id: str, include: str = "active"
    ) -> tuple[Lot, ...]:
        """The account's lots: open ones in the order uses are taken from them (then, with
        include="expired" or "all", the closed ones, newest first)."""
        return await self._run(self._core.lots(oauth_provider, external_id, include))

    def reserve(
        self,
        oauth_provider: str,
        external_id: str,
        *,
        uses: int = 1,
        ttl: int = DEFAULT_HOLD_TTL,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        feature: str | None = None,
        quantity: int | None = None,
    ) -> AsyncHold:
        """Hold `uses` uses for `ttl` seconds, for work whose cost is known only at its end:

            async with billing.reserve("oauth:google", user_id, uses=5, ttl=120) as hold:
                steps = await run_the_agent()
                await hold.capture(steps)

        Entering makes the hold (PurchaseRequiredError when fewer uses are available). An
        exception in the block releases it; a normal exit releases it unless `capture()` was
        called. Past `ttl` the service releases it by itself. By a feature's rate instead of
        uses: `reserve(..., feature="gpt-4o-tokens", quantity=4000)`, then
        `hold.capture(quantity=used)` for a `carry` rate.
        """
        return AsyncHold(
            self,
            HoldState(
                self._core,
                oauth_provider,
                external_id,
                uses=uses,
                ttl_seconds=ttl,
                metadata=metadata,
                idempotency_key=idempotency_key,
                feature=feature,
                quantity=quantity,
            ),
        )

    async def reservation(self, reservation_id: str) -> Reservation:
        """One hold as the service has it now."""
        return await self._run(self._core.reservation(reservation_id))

    async def reservations(
        self,
        oauth_provider: str | None = None,
        external_id: str | None = None,
        status: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> ReservationPage:
        """Holds, newest first: of one identity, and/or in one status."""
        return await self._run(
            self._core.reservations(oauth_provider, external_id, status, limit, offset)
        )

    async def flush_pending(self) -> FlushReport:
        """Record the charges queued while billing was unreachable (exactly once each)."""
        return await self._run(self._core.flush())

    async def aclose(self) -> None:
        """Flush pending charges (best effort; what is left is logged), then close."""
        try:
            await self._run(self._core.close())
        finally:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncBillingClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
