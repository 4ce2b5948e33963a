"""Idempotency keys: a retried request gets the original answer, never a second effect.

Keys are scoped to the API key that sent them (SPEC.md, as Stripe scopes them to an account):
every function here takes the authenticated API key's id, and a use of the same key by another
API key is another request — never replayed to this one, never a conflict with it. Uses from
before keys were scoped (db.LEGACY_SCOPE, migration 0007) belong to no API key: their key stays
taken for everyone (409, never replayed, never applied again).

One key space per API key, kept in two places, known only to this module:
- a charge keeps its key on its own row (`charges.idempotency_key`, unique per API key). That is
  what lets a
  charge be ONE statement: the INSERT that records the charge takes the key in the same atomic
  statement, with no second table to write (hot/writer.py);
- every other request keeps its key in `idempotency_keys` (the primary key, with the API key)
  with the response it
  got, inserted in the same transaction as the effect it guards, so the effect and its recorded
  response commit together or not at all (`claim`, then `record`).

"What happened under this key" is answered with ONE query over both places (`_find`) and one
fingerprint check (`_same_request`), so no caller says where to look: a charge asks
`earlier_charge`, any other request `claim` (or `lookup` before a provider call); a key used
by the other kind of request is a 409. Of two concurrent requests with one key only one can
commit (a unique index in either place: the second waits for the first transaction, then finds
its row). Failed requests roll back, so their key stays free for a retry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Integer, String, Text, literal, null, select, union_all
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import LEGACY_SCOPE, charges, idempotency_keys, insert_or_ignore, utcnow
from ciris_billing.errors import IdempotencyKeyReused, InvalidRequest

MAX_KEY_LENGTH = 255

_ANOTHER_REQUEST = (
    "This Idempotency-Key was already used with a different request; "
    "use a new key for a new request"
)
_A_CHARGE = "This Idempotency-Key was already used for a charge; use a new key"
_BEFORE_SCOPING = "This Idempotency-Key was used before keys were scoped to API keys; use a new key"


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A request (not a charge) made under the key, with the response it got."""

    status_code: int
    body: str


@dataclass(frozen=True, slots=True)
class EarlierCharge:
    """A charge made under the key."""

    charge_id: str


def fingerprint(method: str, path: str, payload: Any) -> str:
    """What makes two requests "the same": method, path and the parsed body, canonically.
    Computed at the edge (routes, answers) from the validated request."""
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


@dataclass(frozen=True, slots=True)
class _Use:
    """One earlier use of a key, from either place."""

    by_charge: bool
    legacy: bool  # made before keys were scoped: no API key's, so never replayed
    fingerprint: str | None
    charge_id: str | None
    response_status: int | None
    response_body: str | None


async def _find(conn: AsyncConnection, api_key_id: str, key: str) -> _Use | None:
    """The earlier use of `key` by this API key (or from before keys were scoped), wherever it
    is kept: one query over both places."""
    scopes = (api_key_id, LEGACY_SCOPE)
    charge_use = select(
        literal(True).label("by_charge"),
        (charges.c.api_key_id == LEGACY_SCOPE).label("legacy"),
        charges.c.request_fingerprint.label("fingerprint"),
        charges.c.id.label("charge_id"),
        null().cast(Integer).label("response_status"),
        null().cast(Text).label("response_body"),
    ).where(charges.c.api_key_id.in_(scopes), charges.c.idempotency_key == key)
    request_use = select(
        literal(False),
        idempotency_keys.c.api_key_id == LEGACY_SCOPE,
        idempotency_keys.c.fingerprint,
        null().cast(String),
        idempotency_keys.c.response_status,
        idempotency_keys.c.response_body,
    ).where(idempotency_keys.c.api_key_id.in_(scopes), idempotency_keys.c.key == key)
    # At most one row per scope: a charge's statement refuses a key already in idempotency_keys
    # and `claim` one already on a charge; should a race between the two leave both, the charge
    # (money moved) is the use that counts. A legacy use wins over all: the key is nobody's.
    rows = (await conn.execute(union_all(charge_use, request_use))).all()
    if not rows:
        return None
    row = max(rows, key=lambda r: (bool(r.legacy), bool(r.by_charge)))
    return _Use(
        bool(row.by_charge),
        bool(row.legacy),
        row.fingerprint,
        row.charge_id,
        row.response_status,
        row.response_body,
    )


def _same_request(use: _Use, request_fingerprint: str) -> None:
    """The one fingerprint check: a key reused for a different request is a 409 (and so is any
    reuse of a key from before keys were scoped: its API key is unknown)."""
    if use.legacy:
        raise IdempotencyKeyReused(_BEFORE_SCOPING)
    if use.fingerprint != request_fingerprint:
        raise IdempotencyKeyReused(_ANOTHER_REQUEST)


async def earlier_charge(
    conn: AsyncConnection, api_key_id: str, key: str, request_fingerprint: str
) -> EarlierCharge | None:
    """For a charge that was not made: the charge this API key already made under `key` (to
    replay), None if the key is unused; 409 if it was used for a different request."""
    use = await _find(conn, api_key_id, key)
    if use is None:
        return None
    if use.legacy:
        raise IdempotencyKeyReused(_BEFORE_SCOPING)
    if not use.by_charge:
        raise IdempotencyKeyReused(_ANOTHER_REQUEST)
    _same_request(use, request_fingerprint)
    assert use.charge_id is not None
    return EarlierCharge(use.charge_id)


async def lookup(
    conn: AsyncConnection, api_key_id: str, key: str, request_fingerprint: str
) -> StoredResponse | None:
    """For a request that is not a charge: the response recorded under this API key's `key`,
    None if the key is unused; 409 if it was used for a different request (a charge included)."""
    use = await _find(conn, api_key_id, key)
    if use is None:
        return None
    if use.legacy:
        raise IdempotencyKeyReused(_BEFORE_SCOPING)
    if use.by_charge:
        raise IdempotencyKeyReused(_A_CHARGE)
    _same_request(use, request_fingerprint)
    assert use.response_status is not None
    assert use.response_body is not None
    return StoredResponse(use.response_status, use.response_body)


async def claim(
    conn: AsyncConnection, api_key_id: str, key: str, request_fingerprint: str
) -> StoredResponse | None:
    """Take this API key's `key` for this request, or return the response already recorded
    under it."""
    stored = await lookup(conn, api_key_id, key, request_fingerprint)
    if stored is not None:
        return stored
    inserted = await conn.execute(
        insert_or_ignore(idempotency_keys)
        .values(
            api_key_id=api_key_id,
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
    # Safe: the INSERT conflicted after waiting for the transaction that took the key, whose row
    # is therefore committed and visible now.
    stored = await lookup(conn, api_key_id, key, request_fingerprint)
    assert stored is not None
    return stored


async def record(
    conn: AsyncConnection, api_key_id: str, key: str, status_code: int, body: str
) -> None:
    await conn.execute(
        idempotency_keys.update()
        .where(idempotency_keys.c.api_key_id == api_key_id, idempotency_keys.c.key == key)
        .values(response_status=status_code, response_body=body)
    )
