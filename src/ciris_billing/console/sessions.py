"""Console sessions: an admin API key logs in once; a server-side session carries on.

- The cookie holds a random 256-bit token (HttpOnly, SameSite=Strict, Path=/console, Secure
  under https); the table stores only its SHA-256, with the API key it was opened with, a CSRF
  token, and two ends: idle (last_seen_at + CONSOLE_SESSION_IDLE_SECONDS) and absolute
  (expires_at). A session dies with its key: revoking the key, or taking its admin scope away,
  ends it at the next request.
- Every form carries the session's CSRF token; the login form, before any session, carries
  HMAC(console secret, a random nonce in a short-lived cookie of its own): a page of another
  site can neither read it nor make it. The nonce is the server's own: it is signed with the
  console secret together with its time of issue and the client address it was issued to, so
  a cookie planted by someone else (a value of their choosing, or a nonce the server issued
  to them) is not accepted: the login page issues a fresh one, the login is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing import clock
from ciris_billing.audit_trail import Operator
from ciris_billing.auth import Principal
from ciris_billing.config import Settings
from ciris_billing.db import api_keys, console_sessions, utcnow

SESSION_COOKIE = "ciris_console"
LOGIN_COOKIE = "ciris_console_login"
COOKIE_PATH = "/console"
LOGIN_NONCE_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class Session:
    operator: Operator
    csrf_token: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def open_session(
    conn: AsyncConnection, principal: Principal, settings: Settings
) -> tuple[str, Session]:
    """A new session for this (admin) key: (the cookie's token, the session)."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    now = utcnow()
    # Housekeeping, cheap at login time: sessions past either end are gone for good.
    await conn.execute(
        delete(console_sessions).where(
            (console_sessions.c.expires_at <= now)
            | (
                console_sessions.c.last_seen_at
                <= now - timedelta(seconds=settings.console_session_idle_seconds)
            )
        )
    )
    await conn.execute(
        console_sessions.insert().values(
            id=_digest(token),
            api_key_id=principal.key_id,
            csrf_token=csrf,
            created_at=now,
            last_seen_at=now,
            expires_at=now + timedelta(seconds=settings.console_session_max_seconds),
        )
    )
    return token, Session(Operator(principal.key_id, principal.name), csrf)


async def current(conn: AsyncConnection, token: str | None, settings: Settings) -> Session | None:
    """The live session of this cookie, its idle clock restarted; None when there is none (no
    cookie, unknown, idle too long, past its end, or its key revoked or no longer admin)."""
    if not token or len(token) > 200:
        return None
    now = utcnow()
    idle_since = now - timedelta(seconds=settings.console_session_idle_seconds)
    # One statement checks both ends and touches the session (no read-then-write race: a
    # session that expires meanwhile simply matches no row).
    touched = (
        await conn.execute(
            console_sessions.update()
            .where(
                console_sessions.c.id == _digest(token),
                console_sessions.c.last_seen_at > idle_since,
                console_sessions.c.expires_at > now,
            )
            .values(last_seen_at=now)
            .returning(console_sessions.c.api_key_id, console_sessions.c.csrf_token)
        )
    ).first()
    if touched is None:
        return None
    key = (
        await conn.execute(
            select(api_keys.c.id, api_keys.c.name, api_keys.c.scopes).where(
                api_keys.c.id == touched.api_key_id, api_keys.c.revoked_at.is_(None)
            )
        )
    ).first()
    if key is None or "admin" not in key.scopes.split(","):
        return None
    return Session(Operator(key.id, key.name), touched.csrf_token)


async def close(conn: AsyncConnection, token: str | None) -> None:
    if token:
        await conn.execute(delete(console_sessions).where(console_sessions.c.id == _digest(token)))


def _nonce_mac(secret: bytes, random: str, issued: str, client: str) -> str:
    message = "\0".join(("console-login-nonce", random, issued, client)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def login_nonce(secret: bytes, client: str, now: float | None = None) -> str:
    """A new login nonce for the browser at `client` (its address): random, signed with its
    time of issue and that address."""
    random = secrets.token_urlsafe(18)
    issued = str(int(clock.timestamp() if now is None else now))
    return f"{random}.{issued}.{_nonce_mac(secret, random, issued, client)}"


def valid_nonce(secret: bytes, nonce: str | None, client: str, now: float | None = None) -> bool:
    """Did this server issue `nonce` to `client`, less than LOGIN_NONCE_SECONDS ago?"""
    if not nonce or len(nonce) > 200 or nonce.count(".") != 2:
        return False
    random, issued, mac = nonce.split(".")
    if not issued.isdigit() or not same_token(_nonce_mac(secret, random, issued, client), mac):
        return False
    age = (clock.timestamp() if now is None else now) - int(issued)
    return 0 <= age < LOGIN_NONCE_SECONDS


def login_csrf(secret: bytes, nonce: str) -> str:
    """The login form's CSRF token for the nonce in its cookie."""
    return hmac.new(secret, b"console-login\0" + nonce.encode(), hashlib.sha256).hexdigest()


def same_token(expected: str, given: str | None) -> bool:
    """Constant-time comparison of two tokens (bytes: compare_digest refuses non-ASCII str)."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())
