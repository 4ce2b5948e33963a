"""The keyed digest an erased identity is kept as.

`HMAC-SHA256(erasure key, SHA-256(provider NUL external_id))`: without the installation's
erasure key (installation.py) a list of emails cannot be matched against erased accounts; with
the identity and the key, an operator can still find (export) what was kept. The inner SHA-256
is what erased accounts stored before the key existed, so migration 20261203_secrets could key
those rows in place without knowing their identities.
"""

from __future__ import annotations

import hashlib
import hmac


def erased_digest(key: bytes, oauth_provider: str, external_id: str) -> str:
    inner = hashlib.sha256(f"{oauth_provider}\0{external_id}".encode()).hexdigest()
    return hmac.new(key, inner.encode(), hashlib.sha256).hexdigest()


def erased_external_id(account_id: str) -> str:
    """An erased account's external_id: unique (one identity may be erased many times) and
    nothing about the person."""
    return f"erased:{account_id}"
