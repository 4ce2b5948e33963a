"""API keys: random 256-bit secrets, stored as SHA-256 digests, with scopes.

A key is high-entropy, so a fast hash is as safe as a slow one and costs microseconds; a short
in-process cache spares the database on the hot path while a revocation still takes effect
within `API_KEY_CACHE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from functools import cache
from typing import Any

from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ciris_billing.db import api_keys, new_id, utcnow
from ciris_billing.errors import AuthenticationRequired, InvalidRequest, ScopeMissing

SCOPES = ("read", "write", "admin")
# Each scope includes the ones before it: admin > write > read.
_RANK = {scope: rank for rank, scope in enumerate(SCOPES)}
KEY_PREFIX = "cbk_"

# The two ways to present a key, as FastAPI security schemes so /openapi.json declares them on
# every secured operation (either one suffices). auto_error=False: a missing or wrong key gets
# this service's own 401 body, not the framework's.
API_KEY_HEADER = APIKeyHeader(
    name="X-API-Key",
    scheme_name="ApiKeyHeader",
    description="An API key in the X-API-Key header (wins over a bearer token if both are sent)",
    auto_error=False,
)
BEARER = HTTPBearer(
    scheme_name="BearerAuth",
    description="An API key as a bearer token: Authorization: Bearer <key>",
    auto_error=False,
)
# Sent with every 401: the challenges of both schemes (RFC 9110 asks for at least one).
WWW_AUTHENTICATE = 'Bearer realm="ciris-billing", ApiKey realm="ciris-billing", header="X-API-Key"'


@dataclass(frozen=True, slots=True)
class Principal:
    key_id: str
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return _top_rank(self.scopes) >= _RANK[scope]


@cache  # a handful of scope sets (subsets of SCOPES): asked on every request
def _top_rank(scopes: frozenset[str]) -> int:
    return max((_RANK[held] for held in scopes), default=-1)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_scopes(text: str) -> frozenset[str]:
    scopes = frozenset(part.strip() for part in text.split(",") if part.strip())
    unknown = scopes - set(SCOPES)
    if not scopes or unknown:
        raise InvalidRequest(f"Scopes must be a comma-separated subset of {', '.join(SCOPES)}")
    return scopes


async def create_key(conn: AsyncConnection, name: str, scopes: frozenset[str]) -> tuple[str, str]:
    """Create a key; returns (key id, the key itself). The key is shown once and never stored."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = new_id("key")
    await conn.execute(
        api_keys.insert().values(
            id=key_id,
            name=name,
            key_prefix=key[:12],
            key_hash=hash_key(key),
            scopes=",".join(sorted(scopes, key=_RANK.__getitem__)),
            created_at=utcnow(),
            revoked_at=None,
        )
    )
    return key_id, key


async def list_keys(conn: AsyncConnection) -> list[Any]:
    result = await conn.execute(
        select(
            api_keys.c.id,
            api_keys.c.name,
            api_keys.c.key_prefix,
            api_keys.c.scopes,
            api_keys.c.created_at,
            api_keys.c.revoked_at,
        ).order_by(api_keys.c.created_at)
    )
    return list(result)


async def count_keys(conn: AsyncConnection) -> int:
    return int(await conn.scalar(select(func.count()).select_from(api_keys)) or 0)


async def revoke_key(conn: AsyncConnection, key_id: str) -> bool:
    result = await conn.execute(
        api_keys.update()
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    return bool(result.rowcount)


def chosen_key(api_key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    """The key the routes' security dependencies found: `X-API-Key` wins, as in
    `presented_key` (both parse the headers the same way)."""
    return api_key or (bearer.credentials if bearer is not None else None)


def same_secret(presented: str, secret: SecretStr) -> bool:
    """Is `presented` this configured secret? (constant time; bytes: compare_digest refuses
    non-ASCII str)"""
    return hmac.compare_digest(presented.encode(), secret.get_secret_value().encode())


def presented_key(headers: Any) -> str | None:
    """The key from `X-API-Key`, or from `Authorization: Bearer ...` (the fast path's reader;
    the routes get the same answer from `API_KEY_HEADER` and `BEARER`, see `chosen_key`)."""
    key: str | None = headers.get("x-api-key")
    if key:
        return key
    authorization: str | None = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class KeyStore:
    """Looks keys up by digest, caching answers (including "no such key") for a few seconds."""

    def __init__(self, engine: AsyncEngine, ttl_seconds: float) -> None:
        self._engine = engine
        self._ttl = ttl_seconds
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._pending: dict[str, asyncio.Future[Principal | None]] = {}

    async def _lookup(self, digest: str) -> Principal | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(
                        api_keys.c.id, api_keys.c.name, api_keys.c.scopes, api_keys.c.key_hash
                    ).where(api_keys.c.key_hash == digest, api_keys.c.revoked_at.is_(None))
                )
            ).first()
        # The lookup is by digest already; compare again in constant time for good measure.
        if row is None or not hmac.compare_digest(row.key_hash, digest):
            return None
        return Principal(row.id, row.name, frozenset(row.scopes.split(",")))

    async def _refresh(self, digest: str) -> Principal | None:
        """One database look-up per key at a time: requests arriving while it runs wait for
        its answer instead of each querying (no stampede when a cached entry expires)."""
        pending = self._pending.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._lookup(digest))
            self._pending[digest] = pending
            try:
                principal = await asyncio.shield(pending)
            finally:
                self._pending.pop(digest, None)
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (time.monotonic() + self._ttl, principal)
            return principal
        return await asyncio.shield(pending)

    async def authenticate(self, key: str | None, scope: str) -> Principal:
        if not key:
            raise AuthenticationRequired(
                "An API key is required: send it as X-API-Key or Authorization: Bearer"
            )
        digest = hash_key(key)
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            principal = cached[1]
        else:
            principal = await self._refresh(digest)
        if principal is None:
            raise AuthenticationRequired("The API key is not valid or has been revoked")
        if not principal.allows(scope):
            raise ScopeMissing(f"This API key lacks the '{scope}' scope")
        return principal
