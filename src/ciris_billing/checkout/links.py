"""Checkout links: where a buyer pays for a purchase.

The client secret travels in the URL *fragment* (`#cs=...`). Browsers never send a fragment to
a server, so the secret reaches no access log, proxy log or `Referer` header; the page's
script reads it from `location.hash` and sends it only in an `X-Client-Secret` header (and to
the payment provider).
"""

from __future__ import annotations

from urllib.parse import quote

CHECKOUT_PATH = "/v1/billing/checkout"


def checkout_url(base_url: str, payment_id: str, client_secret: str) -> str:
    """`{base}/v1/billing/checkout/{payment_id}#cs={client_secret}`.

    `base_url` is the service's public origin (and path prefix, if any), e.g.
    `https://billing.example.com` or a request's `base_url`; a trailing slash is ignored.
    """
    base = base_url.rstrip("/")
    return f"{base}{CHECKOUT_PATH}/{quote(payment_id, safe='')}#cs={quote(client_secret, safe='')}"
