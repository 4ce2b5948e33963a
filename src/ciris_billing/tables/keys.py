"""API keys and the idempotency keys of requests."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    Integer,
    String,
    Table,
    Text,
)

from ciris_billing.tables.base import (
    Id,
    Timestamp,
    metadata,
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Id, primary_key=True),
    Column("name", String(100), nullable=False),
    Column("key_prefix", String(16), nullable=False),
    # SHA-256 of the key: keys are 256-bit random, so a fast hash is safe and costs microseconds.
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("scopes", String(64), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("revoked_at", Timestamp),
)

# Idempotency keys of requests made before keys were scoped to API keys (migration 0007): which
# API key sent them is unknown, so they are no API key's (idempotency.py refuses their reuse).
LEGACY_SCOPE = ""

idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    # Scoped to the API key that sent it (SPEC.md): (API key, key) is the primary key, so two
    # requests with one key from one API key can never both commit; another API key's
    # request with the same key is another request.
    Column("api_key_id", Id, primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),
    Column("response_status", Integer, nullable=False),
    Column("response_body", Text, nullable=False),
    Column("created_at", Timestamp, nullable=False),
)
