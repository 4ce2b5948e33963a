"""The rate book: each process's copy of the rates, so a rated charge reads no table.

A rated charge needs its feature's rate before it is sent (an `up` charge's uses, a `carry`
charge's units_per_use). Reading the table on every request would cost a round trip; the book
keeps the rates in memory and reloads them at most every RATES_REFRESH_SECONDS (default 5 s)
when a charge asks, so a rate change reaches every process within that time, and the process
that made it at once (`forget`). A feature the book does not know is looked up again at once
(a new rate is usable immediately everywhere); still unknown, the charge is refused (422).
"""

from __future__ import annotations

import asyncio
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.errors import InvalidRequest
from ciris_billing.rates.service import Rate, load


class UnknownFeature(InvalidRequest):
    code = "unknown_feature"


class RateBook:
    def __init__(self, engine: AsyncEngine, refresh_seconds: float = 5.0) -> None:
        self._engine = engine
        self._refresh = refresh_seconds
        self._rates: dict[str, Rate] = {}
        self._loaded_at = -float("inf")
        self._lock = asyncio.Lock()

    async def rate(self, feature: str) -> Rate:
        """The feature's rate, or UnknownFeature (422)."""
        if time.monotonic() - self._loaded_at >= self._refresh:
            await self._reload(self._loaded_at)
        found = self._rates.get(feature)
        if found is None:
            # Only for a feature the last load did not have: a new rate is usable at once.
            await self._reload(self._loaded_at)
            found = self._rates.get(feature)
        if found is None:
            raise UnknownFeature(
                f"No rate for feature {feature!r}: set one (POST /v1/billing/rates) first",
                feature=feature,
            )
        return found

    def forget(self) -> None:
        """Reload on the next request (after this process changed a rate)."""
        self._loaded_at = -float("inf")

    async def _reload(self, seen: float) -> None:
        """Load the rates unless another request did since `seen` (the load it saw)."""
        async with self._lock:
            if self._loaded_at != seen:
                return
            async with self._engine.connect() as conn:
                self._rates = await load(conn)
            self._loaded_at = time.monotonic()
