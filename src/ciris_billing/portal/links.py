"""Portal links: a signed, expiring link per account, where its user sees balance and receipts.

`{base}/v1/billing/portal/{token}`. The token names the account's identity and an expiry, signed
with the installation's portal secret (installation.py; a buy link's signature is not a portal
link's). Stateless, so a credit check or a 402 that carries one writes nothing.

Cheap on the hot path: the expiry is rounded up to the next whole hour, so one identity's token
is the same for an hour and is computed once (an LRU cache); a link is valid for
PORTAL_LINK_SECONDS to PORTAL_LINK_SECONDS + 1 h.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from functools import lru_cache

PORTAL_PATH = "/v1/billing/portal"
PORTAL_LINK_SECONDS = 7 * 24 * 3600
_ROUNDING = 3600


class PortalLinkInvalid(ValueError):
    """Not a link this installation signed (tampered, truncated, another secret's)."""


class PortalLinkExpired(ValueError):
    """A link this installation signed, past its expiry."""


def portal_token(
    secret: bytes, oauth_provider: str, external_id: str, now: float | None = None
) -> str:
    moment = time.time() if now is None else now
    expires = (int(moment) // _ROUNDING + 1) * _ROUNDING + PORTAL_LINK_SECONDS
    return _signed(secret, oauth_provider, external_id, expires)


@lru_cache(maxsize=65_536)
def _signed(secret: bytes, oauth_provider: str, external_id: str, expires: int) -> str:
    payload = json.dumps([oauth_provider, external_id, expires], separators=(",", ":")).encode()
    body = base64.urlsafe_b64encode(payload).decode().rstrip("=")
    return f"{body}.{_mac(secret, body)}"


def signed_token(secret: bytes, oauth_provider: str, external_id: str, expires: int) -> str:
    """A token with this exact expiry (tests make expired ones)."""
    return _signed(secret, oauth_provider, external_id, expires)


def read_portal_token(secret: bytes, token: str, now: float | None = None) -> tuple[str, str]:
    """The (oauth_provider, external_id) a valid token names; PortalLinkInvalid for anything
    this installation did not sign, PortalLinkExpired for a signed one past its expiry."""
    body, _, mac = token.partition(".")
    # compare_digest refuses non-ASCII str (a TypeError): a real token is ASCII.
    if (
        not body
        or len(token) > 2048
        or not token.isascii()
        or not hmac.compare_digest(mac, _mac(secret, body))
    ):
        raise PortalLinkInvalid("not signed here")
    try:
        provider, external_id, expires = json.loads(
            base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        )
    except (ValueError, TypeError):
        raise PortalLinkInvalid("not a token") from None
    if not (
        isinstance(provider, str) and isinstance(external_id, str) and isinstance(expires, int)
    ):
        raise PortalLinkInvalid("not a token")
    if expires < (time.time() if now is None else now):
        raise PortalLinkExpired("expired")
    return provider, external_id


def portal_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}{PORTAL_PATH}/{token}"


def _mac(secret: bytes, body: str) -> str:
    return hmac.new(secret, b"portal\0" + body.encode(), hashlib.sha256).hexdigest()[:32]
