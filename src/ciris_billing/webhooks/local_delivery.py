"""Where the sandbox's webhooks go: straight into this service's inbox, in the process that
sends them (`serve`'s workers and `ciris-billing worker` alike).

The sandbox is the service's own stand-in for Stripe and shares its database, so its events
need no network hop: each enters `inbox.receive` (signature checked, stored once by event id,
handled) in a unit of work of its own, exactly as `POST /v1/billing/webhooks/sandbox` would.
Posting to PUBLIC_BASE_URL instead would make redelivery depend on a buyer-facing URL that may
be unset, behind a proxy, or unreachable from the worker's host; in process, any process that
runs the jobs redelivers (sandbox_webhooks.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.payments.providers.base import PaymentProvider
from ciris_billing.unit_of_work import unit_of_work
from ciris_billing.webhooks import inbox


def to_inbox(
    engine: AsyncEngine, provider: Callable[[], PaymentProvider], retry_base_seconds: float
) -> Callable[[bytes, str], Awaitable[None]]:
    """A sandbox `deliver`: the provider is named late (it is built with this function)."""

    async def deliver(payload: bytes, signature: str) -> None:
        # Its own unit of work: the request or job that made the change has committed it.
        async with unit_of_work(engine) as work:
            await inbox.receive(
                work, provider(), payload, signature, retry_base_seconds=retry_base_seconds
            )

    return deliver
