"""The one codec of the public links' tokens (buy links, portal links): sealed, expiring.

A token is `base64url(nonce || AES-256-GCM(key, nonce, JSON([expires, *fields]), purpose))`:
opaque (nothing in it can be read without the installation's secret: no identity, no email,
not even the expiry) and tamper-proof (GCM's tag). Each purpose (`buy`, `portal`) has its own
key, derived from its installation secret, and is bound as the associated data, so one kind of
link is never accepted as another.

Why sealed rather than random tokens with a stored digest: a credit check and a 402 carry a
link, and minting one must cost no database write. Sealing costs about 4 us (measured: 4.3 us
a token, against 7.8 us for the signed base64 it replaced), so no cache is needed; what a
stored token would give besides (revocation) is kept per account instead (portal/links.py).
Library: `cryptography` (pyca), the well-kept standard for AEAD in Python.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ciris_billing import clock

MAX_TOKEN_LENGTH = 2048
_NONCE = 12
# One encoder for every token: json.dumps(..., separators=...) builds a new one per call
# (measured 6 us of a 9 us seal).
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
Field = str | int


class LinkInvalid(ValueError):
    """Not a token this installation sealed for this purpose (tampered, truncated, other)."""


class LinkExpired(ValueError):
    """A token this installation sealed, past its expiry."""


@lru_cache(maxsize=64)
def _aead(secret: bytes, purpose: str) -> AESGCM:
    key = hmac.new(secret, b"ciris-link-token\0" + purpose.encode(), hashlib.sha256).digest()
    return AESGCM(key)


def seal(secret: bytes, purpose: str, fields: Sequence[Field], expires: int) -> str:
    """A token carrying `fields` until `expires` (Unix seconds), readable only by `unseal`."""
    nonce = os.urandom(_NONCE)
    plain = _ENCODE([expires, *fields]).encode()
    sealed = _aead(secret, purpose).encrypt(nonce, plain, purpose.encode())
    return base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")


def unseal(secret: bytes, purpose: str, token: str, now: float | None = None) -> list[Field]:
    """The fields of a valid token; LinkInvalid or LinkExpired otherwise."""
    if not token or len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise LinkInvalid("not a token")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        plain = _aead(secret, purpose).decrypt(raw[:_NONCE], raw[_NONCE:], purpose.encode())
        expires, *fields = json.loads(plain)
    except (binascii.Error, ValueError, InvalidTag, TypeError):
        raise LinkInvalid("not sealed here") from None
    if not isinstance(expires, int) or not all(isinstance(f, str | int) for f in fields):
        raise LinkInvalid("not a token")
    if expires < (clock.timestamp() if now is None else now):
        raise LinkExpired("expired")
    return list(fields)
