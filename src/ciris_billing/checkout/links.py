"""Checkout links: where a buyer pays for a purchase.

The client secret travels in the URL *fragment* (`#cs=...`). Browsers never send a fragment to
a server, so the secret reaches no access log, proxy log or `Referer` header; the page's
script reads it from `location.hash` and sends it only in an `X-Client-Secret` header (and to
the payment provider).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from urllib.parse import quote

CHECKOUT_PATH = "/v1/billing/checkout"


def checkout_url(base_url: str, payment_id: str, client_secret: str) -> str:
    """`{base}/v1/billing/checkout/{payment_id}#cs={client_secret}`.

    `base_url` is the service's public origin (and path prefix, if any), e.g.
    `https://billing.example.com` or a request's `base_url`; a trailing slash is ignored.
    """
    base = base_url.rstrip("/")
    return f"{base}{CHECKOUT_PATH}/{quote(payment_id, safe='')}#cs={quote(client_secret, safe='')}"


BUY_PATH = "/v1/billing/buy"
OFFER_LIFETIME_SECONDS = 24 * 3600


def buy_token(
    secret: bytes, oauth_provider: str, external_id: str, now: float | None = None
) -> str:
    """A signed, expiring token naming an identity: whoever holds it may start a purchase for
    that identity (and nothing else). Stateless, so a 402 costs no database write."""
    expires = int((time.time() if now is None else now) + OFFER_LIFETIME_SECONDS)
    body = (
        base64.urlsafe_b64encode(
            json.dumps([oauth_provider, external_id, expires], separators=(",", ":")).encode()
        )
        .decode()
        .rstrip("=")
    )
    return f"{body}.{_mac(secret, body)}"


def read_buy_token(secret: bytes, token: str, now: float | None = None) -> tuple[str, str] | None:
    """The (oauth_provider, external_id) of a valid, unexpired token; None otherwise."""
    body, _, mac = token.partition(".")
    # A real token is ASCII; compare_digest raises a TypeError on non-ASCII str (was a 500).
    if not body or not token.isascii() or not hmac.compare_digest(mac, _mac(secret, body)):
        return None
    try:
        provider, external_id, expires = json.loads(
            base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        )
    except (ValueError, TypeError):
        return None
    if (
        not isinstance(provider, str)
        or not isinstance(external_id, str)
        or not isinstance(expires, int)
    ):
        return None
    if expires < (time.time() if now is None else now):
        return None
    return provider, external_id


def buy_url(base_url: str, token: str) -> str:
    """`{base}/v1/billing/buy/{token}`: opening it starts a purchase and shows the payment page."""
    return f"{base_url.rstrip('/')}{BUY_PATH}/{token}"


def _mac(secret: bytes, body: str) -> str:
    return hmac.new(secret, body.encode(), hashlib.sha256).hexdigest()[:32]
