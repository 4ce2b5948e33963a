"""Standard Webhooks signatures (https://www.standardwebhooks.com), through the spec's own
library: `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
"id.timestamp.body">`, one `v1,...` per secret in force, space-separated (a rotated-out secret
keeps signing beside the new one for a while, so receivers can switch without losing events).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable
from datetime import datetime

from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
SECRET_BYTES = 32


def new_secret() -> str:
    """A signing secret: whsec_ + base64 of 32 random bytes (the format the library reads)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signature(secrets_in_force: Iterable[str], message_id: str, at: datetime, body: str) -> str:
    """The webhook-signature header: one v1 signature per secret."""
    return " ".join(
        Webhook(secret).sign(msg_id=message_id, timestamp=at, data=body)
        for secret in secrets_in_force
    )


def headers(
    secrets_in_force: Iterable[str], message_id: str, at: datetime, body: str
) -> dict[str, str]:
    """The three Standard Webhooks headers of one delivery attempt (sent at `at`, UTC)."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signature(secrets_in_force, message_id, at, body),
    }
