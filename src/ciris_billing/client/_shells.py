"""The sync and async clients: thin shells that run the core's programs over httpx."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, TypeVar

import httpx

from ciris_billing.client._core import ClientCore, Program, Reply, Sleep
from ciris_billing.client.models import (
    Charge,
    CreditCheck,
    FlushReport,
    PendingCharge,
    Purchase,
    TransactionPage,
)

T = TypeVar("T")

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_RETRIES = 3
DEFAULT_BACKOFF = 0.25
DEFAULT_MAX_BACKOFF = 10.0


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
    """Blocking client for the CIRIS Billing API; see `ciris_billing.client` for the policy.

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
    ) -> None:
        self._core = ClientCore(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            fail_open_grace_seconds=fail_open_grace_seconds,
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
    ) -> Charge:
        """Record `uses` uses. Raises PurchaseRequiredError (402) when none is left."""
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
            )
        )

    def purchase(
        self,
        oauth_provider: str,
        external_id: str,
        customer_email: str | None = None,
        idempotency_key: str | None = None,
    ) -> Purchase:
        """Start buying uses; pay with `checkout_url` or `client_secret`."""
        return self._run(
            self._core.purchase(oauth_provider, external_id, customer_email, idempotency_key)
        )

    def purchase_status(self, payment_id: str) -> Purchase:
        """A purchase's current state (`succeeded` once its uses are credited)."""
        return self._run(self._core.purchase_status(payment_id))

    def transactions(
        self, oauth_provider: str, external_id: str, limit: int = 50, offset: int = 0
    ) -> TransactionPage:
        """A page of the account's ledger, newest first."""
        return self._run(self._core.transactions(oauth_provider, external_id, limit, offset))

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
    """Asyncio client for the CIRIS Billing API; see `ciris_billing.client` for the policy.

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
    ) -> None:
        self._core = ClientCore(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            fail_open_grace_seconds=fail_open_grace_seconds,
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
    ) -> Charge:
        """Record `uses` uses. Raises PurchaseRequiredError (402) when none is left."""
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
            )
        )

    async def purchase(
        self,
        oauth_provider: str,
        external_id: str,
        customer_email: str | None = None,
        idempotency_key: str | None = None,
    ) -> Purchase:
        """Start buying uses; pay with `checkout_url` or `client_secret`."""
        return await self._run(
            self._core.purchase(oauth_provider, external_id, customer_email, idempotency_key)
        )

    async def purchase_status(self, payment_id: str) -> Purchase:
        """A purchase's current state (`succeeded` once its uses are credited)."""
        return await self._run(self._core.purchase_status(payment_id))

    async def transactions(
        self, oauth_provider: str, external_id: str, limit: int = 50, offset: int = 0
    ) -> TransactionPage:
        """A page of the account's ledger, newest first."""
        return await self._run(self._core.transactions(oauth_provider, external_id, limit, offset))

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
