"""Checkout links: where a buyer pays for a purchase.

The client secret travels in the URL *fragment* (`#cs=...`). Browsers never send a fragment to
a server, so the secret reaches no access log, proxy log or `Referer` header; the page's
script reads it from `location.hash` and sends it only in an `X-Client-Secret` header (and to
the payment provider).
"""

from __future__ import annotations

from urllib.parse import quote

from ciris_billing import clock
from ciris_billing.link_tokens import LinkExpired, LinkInvalid, seal, unseal

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
_PURPOSE = "buy"


def buy_token(
    secret: bytes, oauth_provider: str, external_id: str, now: float | None = None
) -> str:
    """A sealed, expiring token (link_tokens.py: opaque, no personal data readable) naming an
    identity: whoever holds it may start a purchase for that identity (and nothing else).
    Stateless, so a 402 costs no database write."""
    expires = int((clock.timestamp() if now is None else now) + OFFER_LIFETIME_SECONDS)
    return seal(secret, _PURPOSE, [oauth_provider, external_id], expires)


def read_buy_token(secret: bytes, token: str, now: float | None = None) -> tuple[str, str] | None:
    """The (oauth_provider, external_id) of a valid, unexpired token; None otherwise."""
    try:
        fields = unseal(secret, _PURPOSE, token, now)
    except (LinkInvalid, LinkExpired):
        return None
    if len(fields) != 2 or not all(isinstance(field, str) for field in fields):
        return None
    return str(fields[0]), str(fields[1])


def buy_url(base_url: str, token: str) -> str:
    """`{base}/v1/billing/buy/{token}`: opening it starts a purchase and shows the payment page."""
    return f"{base_url.rstrip('/')}{BUY_PATH}/{token}"
