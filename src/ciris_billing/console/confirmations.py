"""The console's confirmation tokens: an action runs only with the token its confirmation page
issued.

The page names the action and its exact fields (what it said would change) and a fresh
`request_id`; its token is HMAC(console secret, the session's CSRF token, the action, the
fields, the request id, an expiry). So a Confirm the server did not issue (a form posted with
`confirm=yes` straight away, fields changed after the page was shown, another session's page,
or a page older than CONFIRMATION_SECONDS) is refused; and the request id is unique in the
audit trail (console/actions.py), so a token is used once.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from ciris_billing import clock
from ciris_billing.console.sessions import same_token

CONFIRMATION_SECONDS = 15 * 60


def _mac(
    secret: bytes, csrf: str, action: str, fields: dict[str, str], request_id: str, expires: str
) -> str:
    message = json.dumps(
        ["console-confirmation", csrf, action, sorted(fields.items()), request_id, expires]
    ).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def issue(
    secret: bytes,
    csrf: str,
    action: str,
    fields: dict[str, str],
    request_id: str,
    now: float | None = None,
) -> str:
    """The token the confirmation page carries for this action, its fields and request id."""
    expires = str(int((clock.timestamp() if now is None else now) + CONFIRMATION_SECONDS))
    return f"{expires}.{_mac(secret, csrf, action, fields, request_id, expires)}"


def valid(
    secret: bytes,
    token: str | None,
    csrf: str,
    action: str,
    fields: dict[str, str],
    request_id: str,
    now: float | None = None,
) -> bool:
    """Did a confirmation page of this session issue `token` for exactly this, not too long
    ago?"""
    if not token or len(token) > 200 or "." not in token:
        return False
    expires, mac = token.split(".", 1)
    if not expires.isdigit() or (clock.timestamp() if now is None else now) >= int(expires):
        return False
    return same_token(_mac(secret, csrf, action, fields, request_id, expires), mac)
