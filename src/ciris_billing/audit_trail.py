"""The audit trail: who did what to which account, when, by which door, and what changed.

One row per operator action, whatever the door it came through (issue 21 finding 10): an API
request with an admin key (`door` 'api', the actor the key's name), a CLI command ('cli', the
operating-system user) or a console confirmation ('console', the signed-in key's name). Each
is written in the action's own transaction (so a row exists exactly when the action
committed): the operator, the action, its parameters (`detail`), and the state it changed
`before` and `after`. Rows hold ids, counts and the operator's own words, never an identity or
an email (erasure has nothing to scrub here).

`request_id` is unique: the console's confirmation's one-time id (a confirmation submitted
twice inserts nothing the second time, and that transaction, with its action, rolls back:
ActionAlreadyDone); a fresh id for the API and the CLI, whose retries are made safe by their
Idempotency-Key (a replay runs no action, so writes no row).
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.auth import Principal
from ciris_billing.db import audit_trail, insert_or_ignore, new_id, utcnow
from ciris_billing.errors import ActionAlreadyDone
from ciris_billing.observability import log


@dataclass(frozen=True, slots=True)
class Operator:
    """Who acts: the API key the console session was opened with, the API key of an API
    request (door 'api'), or the user running the CLI (door 'cli', no key)."""

    key_id: str | None
    name: str
    door: str = "console"


def api_operator(principal: Principal) -> Operator:
    return Operator(principal.key_id, principal.name, "api")


def cli_operator() -> Operator:
    """The operating-system user running the command (its login name, as `who` shows it)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        name = f"uid {os.getuid()}"
    return Operator(None, name[:100] or "unknown", "cli")


def account_state(row: Any) -> dict[str, Any]:
    """An account's state as the audit trail records it: counts and status, nothing personal."""
    return {
        "status": row.status,
        "free_uses": int(row.free_uses_remaining),
        "paid_uses": int(row.paid_uses_remaining),
        "held_uses": int(row.reserved_free_uses) + int(row.reserved_paid_uses),
        "dispute_held_uses": int(row.held_uses),
        "total_uses": int(row.total_uses),
    }


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
            door=operator.door,
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


async def record_action(conn: AsyncConnection, operator: Operator, entry: Entry) -> str:
    """An API or CLI action's row, in the caller's transaction (a fresh request id: their
    retries are kept once by the Idempotency-Key, not by this row)."""
    entry_id = await record(conn, operator, entry, new_id("req"))
    log.info(
        "operator_action",
        action=entry.action,
        account_id=entry.account_id,
        operator=operator.name,
        door=operator.door,
        audit_id=entry_id,
    )
    return entry_id


async def entries(
    conn: AsyncConnection,
    *,
    account_id: str | None = None,
    action: str | None = None,
    since: datetime | None = None,
    door: str | None = None,
    limit: int = 50,
) -> list[Row[Any]]:
    """The newest rows first (of one account, one action, since a time, one door, when
    given)."""
    query = select(audit_trail).order_by(audit_trail.c.created_at.desc(), audit_trail.c.id.desc())
    if account_id is not None:
        query = query.where(audit_trail.c.account_id == account_id)
    if action is not None:
        query = query.where(audit_trail.c.action == action)
    if door is not None:
        query = query.where(audit_trail.c.door == door)
    if since is not None:
        query = query.where(audit_trail.c.created_at >= since)
    return list(await conn.execute(query.limit(limit)))


async def entry(conn: AsyncConnection, entry_id: str) -> Row[Any] | None:
    return (await conn.execute(select(audit_trail).where(audit_trail.c.id == entry_id))).first()


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(field, before, after) for each field that differs, in a stable order."""
    names = list(dict.fromkeys([*before, *after]))
    return [(n, before.get(n), after.get(n)) for n in names if before.get(n) != after.get(n)]
