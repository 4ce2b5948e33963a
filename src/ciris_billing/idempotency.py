"""Idempotency keys: a retried request gets the original response, never a second effect.

The key row is inserted in the same transaction as the mutation it guards, and the key is the
table's primary key. So the effect and its recorded response commit together or not at all,
and of two concurrent requests with one key only one can commit: on PostgreSQL the second
INSERT waits for the first transaction, then finds the row; on SQLite writers are serialized.
Failed requests (any error) roll back, so their key stays free for a retry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import charges, idempotency_keys, insert_or_ignore, utcnow
from ciris_billing.errors import IdempotencyKeyReused, InvalidRequest

MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status_code: int
    body: str


def fingerprint(method: str, path: str, payload: Any) -> str:
    """What makes two requests "the same": method, path and the parsed body, canonically."""
    canonical = json.dumps([method, path, payload], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def resolve_key(header: str | None, body_field: str | None = None) -> str | None:
    """The request's key, from the `Idempotency-Key` header or the body's `idempotency_key`."""
    if header is not None and body_field is not None and header != body_field:
        raise InvalidRequest("Idempotency-Key header and body idempotency_key differ")
    key = header if header is not None else body_field
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidRequest(f"Idempotency key must be 1 to {MAX_KEY_LENGTH} printable characters")
    return key


async def claim(conn: AsyncConnection, key: str, request_fingerprint: str) -> StoredResponse | None:
    """Take the key for this request, or return the response already recorded under it."""
    await _refuse_if_charge_key(conn, key)
    inserted = await conn.execute(
        insert_or_ignore(conn, idempotency_keys)
        .values(
            key=key,
            fingerprint=request_fingerprint,
            response_status=0,
            response_body="",
            created_at=utcnow(),
        )
        .returning(idempotency_keys.c.key)
    )
    if inserted.first() is not None:
        return None
    stored = await lookup(conn, key, request_fingerprint)
    assert stored is not None  # the INSERT conflicted, so the row exists (and is committed)
    return stored


async def lookup(
    conn: AsyncConnection, key: str, request_fingerprint: str, *, charges_too: bool = True
) -> StoredResponse | None:
    """The response recorded under `key`, None if the key is unused; 409 for another request
    (including a key a charge already used: charges keep their keys on their own rows)."""
    stored = (
        await conn.execute(select(idempotency_keys).where(idempotency_keys.c.key == key))
    ).first()
    if stored is None:
        if charges_too:
            await _refuse_if_charge_key(conn, key)
        return None
    if stored.fingerprint != request_fingerprint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request; "
            "use a new key for a new request",
        )
    return StoredResponse(stored.response_status, stored.response_body)


async def record(conn: AsyncConnection, key: str, status_code: int, body: str) -> None:
    await conn.execute(
        idempotency_keys.update()
        .where(idempotency_keys.c.key == key)
        .values(response_status=status_code, response_body=body)
    )


async def key_exists(conn: AsyncConnection, key: str) -> bool:
    """Whether `key` was used on a request recorded in the generic table."""
    found = await conn.scalar(select(idempotency_keys.c.key).where(idempotency_keys.c.key == key))
    return found is not None


async def _refuse_if_charge_key(conn: AsyncConnection, key: str) -> None:
    if await conn.scalar(select(charges.c.id).where(charges.c.idempotency_key == key)):
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used for a charge; use a new key"
        )
