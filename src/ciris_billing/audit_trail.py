"""The audit trail: who did what to which account in the console, when, and what changed.

One row per confirmed operator action, written in the action's own transaction (so a row exists
exactly when the action committed): the operator (the API key's name and id), the action, its
parameters (`detail`), and the state it changed `before` and `after`. Rows hold ids, counts and
the operator's own words, never an identity or an email (erasure has nothing to scrub here).

`request_id` is the confirmation's one-time id and is unique: a confirmation submitted twice
(a double click, a resent form) inserts nothing the second time, and that transaction, with
its action, rolls back (ActionAlreadyDone).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import audit_trail, insert_or_ignore, new_id, utcnow
from ciris_billing.errors import ActionAlreadyDone


@dataclass(frozen=True, slots=True)
class Operator:
    """Who acts: the API key the console session was opened with."""

    key_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Entry:
    action: str
    account_id: str | None
    subject: str | None
    detail: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]


async def record(conn: AsyncConnection, operator: Operator, entry: Entry, request_id: str) -> str:
    """Write the row in the caller's transaction; ActionAlreadyDone if `request_id` was used."""
    entry_id = new_id("aud")
    # Safe under a double submit: the unique request_id lets one insert win; the other waits
    # for it, inserts nothing, and its whole transaction rolls back with the error below.
    inserted = await conn.execute(
        insert_or_ignore(audit_trail)
        .values(
            id=entry_id,
            created_at=utcnow(),
            actor=operator.name,
            api_key_id=operator.key_id,
            action=entry.action,
            account_id=entry.account_id,
            subject=entry.subject,
            detail=entry.detail,
            before=entry.before,
            after=entry.after,
            request_id=request_id,
        )
        .returning(audit_trail.c.id)
    )
    if inserted.first() is None:
        raise ActionAlreadyDone("This confirmation was already used; the action was done once")
    return entry_id


async def entries(
    conn: AsyncConnection,
    *,
    account_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    limit: int = 50,
) -> list[Row[Any]]:
    """The newest rows first (of one account, one action, since a time, when given)."""
    query = select(audit_trail).order_by(audit_trail.c.created_at.desc(), audit_trail.c.id.desc())
    if account_id is not None:
        query = query.where(audit_trail.c.account_id == account_id)
    if action is not None:
        query = query.where(audit_trail.c.action == action)
    if since is not None:
        query = query.where(audit_trail.c.created_at >= since)
    return list(await conn.execute(query.limit(limit)))


async def entry(conn: AsyncConnection, entry_id: str) -> Row[Any] | None:
    return (await conn.execute(select(audit_trail).where(audit_trail.c.id == entry_id))).first()


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, before, after) for each field that differs, in a stable order."""
    names = list(dict.fromkeys([*before, *after]))
    return [(n, before.get(n), after.get(n)) for n in names if before.get(n) != after.get(n)]
