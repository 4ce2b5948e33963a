"""The operator console as a browser without JavaScript uses it: forms in, pages out.

`Console` signs in through the login form (its CSRF token, its cookie) and runs an action in
its two steps (the form, then the confirmation page's Confirm), as tests/console do. Plus what
the tests read from the database: audit-trail rows and sessions.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.db import (
    audit_trail,
    console_sessions,
    sandbox_payments,
    utcnow,
    webhook_events,
)

# The operator console: no API key on each request, its session instead (an admin key signed
# in; tests/console/test_console_sessions.py: without one, every page goes to the login form).
CONSOLE_SESSION = {
    "/console",
    "/console/logout",
    "/console/accounts",
    "/console/accounts/{account_id}",
    "/console/webhooks",
    "/console/keys",
    "/console/rates",
    "/console/endpoints",
    "/console/audit",
    "/console/catalog",
    "/console/actions/{action}",
    "/console/reports",
    "/console/reports/{name}.csv",
    "/console/exports/{name}.csv",
}

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
_REQUEST_ID = re.compile(r'name="request_id" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found is not None, "no CSRF token in the page"
    return found.group(1)


@dataclass
class Console:
    http: httpx.AsyncClient

    async def sign_in(self, key: str) -> httpx.Response:
        form = await self.http.get("/console/login")
        assert form.status_code == 200, form.text
        return await self.http.post(
            "/console/login", data={"csrf_token": csrf_of(form.text), "api_key": key}
        )

    async def csrf(self) -> str:
        page = await self.http.get("/console")
        assert page.status_code == 200, page.status_code
        return csrf_of(page.text)

    async def confirmation(self, action: str, fields: dict[str, str]) -> httpx.Response:
        """The first step: the action's form posted (answers the confirmation page)."""
        return await self.http.post(
            f"/console/actions/{action}", data={"csrf_token": await self.csrf(), **fields}
        )

    async def act(self, action: str, fields: dict[str, str]) -> httpx.Response:
        """Both steps: the form, then Confirm on the confirmation page (as it was rendered)."""
        page = await self.confirmation(action, fields)
        assert page.status_code == 200, page.text
        return await self.confirm(action, page.text)

    async def confirm(self, action: str, confirmation_page: str) -> httpx.Response:
        hidden = {
            name: html.unescape(value)
            for name, value in re.findall(
                r'<input type="hidden" name="([^"]+)" value="([^"]*)">', confirmation_page
            )
        }
        assert hidden.get("confirm") == "yes"
        assert _REQUEST_ID.search(confirmation_page)
        return await self.http.post(f"/console/actions/{action}", data=hidden)


async def trail(
    engine: AsyncEngine, account_id: str | None = None, door: str | None = None
) -> list[Any]:
    """The audit-trail rows, oldest first (of one account, one door, when given)."""
    query = select(audit_trail).order_by(audit_trail.c.created_at, audit_trail.c.id)
    if account_id is not None:
        query = query.where(audit_trail.c.account_id == account_id)
    if door is not None:
        query = query.where(audit_trail.c.door == door)
    async with engine.connect() as conn:
        return list(await conn.execute(query))


async def age_sessions(engine: AsyncEngine, **values: Any) -> None:
    """Move every session's clocks (last_seen_at, expires_at) as a test needs, no sleeping."""
    async with engine.begin() as conn:
        await conn.execute(update(console_sessions).values(**values))


async def paid_without_webhook(engine: AsyncEngine, payment_id: str) -> str:
    """The payment paid at the sandbox (by a visa ending 4242) but its webhook's handling
    failed: the event stored unhandled, two attempts, an error. Returns the event's row id."""
    payload = {
        "id": f"evt_failed_{payment_id}",
        "object": "event",
        "type": "payment_intent.succeeded",
        "created": 1_790_000_000,
        "data": {"object": {"id": payment_id, "object": "payment_intent"}},
    }
    row_id = f"whe_failed_{payment_id[-12:]}"
    async with engine.begin() as conn:
        await conn.execute(
            update(sandbox_payments)
            .where(sandbox_payments.c.id == payment_id)
            .values(status="succeeded", card_brand="visa", card_last4="4242")
        )
        await conn.execute(
            webhook_events.insert().values(
                id=row_id,
                provider="sandbox",
                event_id=payload["id"],
                type=payload["type"],
                payment_id=payment_id,
                payload=json.dumps(payload),
                received_at=utcnow(),
                handled_at=None,
                outcome=None,
                attempts=2,
                last_error="ProviderUnavailable",
            )
        )
    return row_id
