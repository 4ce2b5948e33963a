"""Portal links: an expiring, revocable link per account, where its user sees balance and receipts.

`{base}/v1/billing/portal/{token}`. The token is sealed (link_tokens.py: opaque, nothing of the
person readable) with the installation's portal secret, and carries the account's identity, what
the link may do and when it was issued:

- `read`: balance, usage, receipts, buy more. What a link made by a read key gets (a credit
  check by a read key must not hand out a link that changes the account);
- `write`: also switches auto top-up and removes the saved card. Made by a write (or admin)
  key: a charge's or a purchase's answer, a check by such a key, or `POST .../portal_link`.

A link lasts PORTAL_LINK_SECONDS (default 7 days). Revoking an account's links (API, CLI,
console: `revoke_links`) voids every link issued until then; links issued later work. Stateless
to mint, so a credit check or a 402 that carries one writes nothing; revocation is read only
when a link is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import clock
from ciris_billing.db import portal_link_revocations, utcnow
from ciris_billing.link_tokens import LinkExpired, LinkInvalid, seal, unseal

PORTAL_PATH = "/v1/billing/portal"
DEFAULT_PORTAL_LINK_SECONDS = 7 * 24 * 3600
_PURPOSE = "portal"
Scope = Literal["read", "write"]
_SCOPES = ("read", "write")


class PortalLinkInvalid(LinkInvalid):
    """Not a link this installation made (tampered, truncated, another secret's), or revoked."""


class PortalLinkExpired(LinkExpired):
    """A link this installation made, past its expiry."""


@dataclass(frozen=True, slots=True)
class PortalLink:
    oauth_provider: str
    external_id: str
    scope: Scope
    issued_ms: int  # when it was made, Unix milliseconds (revocation voids those made before)

    @property
    def may_write(self) -> bool:
        return self.scope == "write"


def portal_token(
    secret: bytes,
    oauth_provider: str,
    external_id: str,
    scope: Scope = "read",
    *,
    lifetime_seconds: int = DEFAULT_PORTAL_LINK_SECONDS,
    now: float | None = None,
) -> str:
    moment = clock.timestamp() if now is None else now
    fields: list[str | int] = [oauth_provider, external_id, scope, int(moment * 1000)]
    return seal(secret, _PURPOSE, fields, int(moment) + lifetime_seconds)


def read_portal_token(secret: bytes, token: str, now: float | None = None) -> PortalLink:
    """What a valid token says; PortalLinkInvalid for anything this installation did not make,
    PortalLinkExpired for one past its expiry. (Revocation: `still_valid`.)"""
    try:
        fields = unseal(secret, _PURPOSE, token, now)
    except LinkExpired:
        raise PortalLinkExpired("expired") from None
    except LinkInvalid:
        raise PortalLinkInvalid("not made here") from None
    match fields:
        case [str(provider), str(external_id), str(scope), int(issued)] if scope in _SCOPES:
            return PortalLink(provider, external_id, scope, issued)  # type: ignore[arg-type]
    raise PortalLinkInvalid("not a portal link")


async def still_valid(conn: AsyncConnection, account_id: str, link: PortalLink) -> bool:
    """False when the account's links were revoked after this one was made."""
    revoked = await conn.scalar(
        select(portal_link_revocations.c.revoked_at).where(
            portal_link_revocations.c.account_id == account_id
        )
    )
    return revoked is None or link.issued_ms > _ms(revoked)


async def revoke_links(conn: AsyncConnection, account_id: str) -> datetime:
    """Void every portal link of the account made until now (links made later work)."""
    now = utcnow()
    # Safe when two revocations race: one row per account, the later time wins (GREATEST).
    await conn.execute(
        pg_insert(portal_link_revocations)
        .values(account_id=account_id, revoked_at=now)
        .on_conflict_do_update(
            index_elements=["account_id"],
            set_={"revoked_at": now},
            where=portal_link_revocations.c.revoked_at < now,
        )
    )
    return now


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def portal_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}{PORTAL_PATH}/{token}"
