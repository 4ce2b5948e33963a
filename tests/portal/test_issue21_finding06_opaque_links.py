"""Issue 21, finding 6: "Links carry the identity".

The attack: `portal_url` and the 402's `checkout_url` (buy link) tokens were readable base64 of
`["oauth:google","bob@example.com",expiry]`. Now both are sealed by one codec
(link_tokens.py, AES-256-GCM): nothing of the person can be read from any URL, and the links
still work.
"""

from __future__ import annotations

import base64
import binascii
from urllib.parse import unquote

import httpx

from tests.support.api import Api, identity
from tests.support.flows import exhaust_free_uses

EMAIL = "bob.opaque@example.com"
BOB = identity(EMAIL)


def _readable(url: str) -> str:
    """Everything that can be read from a URL: itself, unquoted, and every piece of its path
    decoded as base64 where it decodes."""
    seen = [url, unquote(url)]
    for piece in httpx.URL(url).path.replace(".", "/").split("/"):
        for candidate in (piece, piece + "=" * (-len(piece) % 4)):
            try:
                seen.append(base64.urlsafe_b64decode(candidate).decode("latin-1"))
            except (binascii.Error, ValueError):
                continue
    return "\n".join(seen)


async def test_issue21_finding06_no_personal_data_in_portal_and_buy_links(api: Api) -> None:
    checked = await api.post("/v1/billing/credits/check", {**BOB, "context": {}}, scope="read")
    assert checked.status_code == 200, checked.text
    await exhaust_free_uses(api, BOB)
    refused = await api.post("/v1/billing/charges", BOB)
    assert refused.status_code == 402, refused.text
    urls = [
        checked.json()["portal_url"],
        refused.json()["portal_url"],
        refused.json()["checkout_url"],
    ]
    for url in urls:
        text = _readable(url)
        for personal in (EMAIL, "bob.opaque", "oauth:google"):
            assert personal not in text, (personal, url)

    # The sealed links still work: the portal shows the account, the buy link starts a purchase.
    portal = await api.http.get(httpx.URL(urls[0]).path)
    assert portal.status_code == 200, portal.text
    buy = await api.http.get(httpx.URL(urls[2]).path)
    assert buy.status_code == 303, buy.text
    assert "/v1/billing/checkout/" in buy.headers["Location"]
    assert EMAIL not in buy.headers["Location"]
    assert (await api.audit()).clean
