"""The payment page: a public checkout link per purchase, paid with its client secret.

`checkout_url(base_url, payment_id, client_secret)` builds the link (importing it pulls in
nothing else, so any module may use it); `ciris_billing.checkout.routes.router` serves the
page, its script and style, and the summary JSON the page reads.
"""

from __future__ import annotations

from ciris_billing.checkout.links import buy_token, buy_url, checkout_url, read_buy_token

__all__ = ["buy_token", "buy_url", "checkout_url", "read_buy_token"]
