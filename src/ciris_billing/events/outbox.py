"""The transactional outbox: `record_event` writes an event in the CALLER's transaction.

An event row is written in the same transaction as the change it reports, so there is never an
event without its change nor a change without its event; the job queue delivers it afterwards
(delivery.py). Each event of an account takes the account's next sequence number
(`accounts.event_sequence`, bumped by the same UPDATE that returns it): the account's row lock
makes the numbers gap-free and in commit order per account, so consumers can order an account's
events and notice a missing one.

Lock order: `record_event` locks the account's row (if the transaction does not hold it yet).
Call it after any other row the transaction locks before its account (purchase, reservation),
never before them: accounts rows are locked last, as everywhere else.

Balance events (balance.low, balance.depleted) fire on crossings of available uses (free +
paid, which excludes held uses): low when they go from at or above the account's threshold to
below it, depleted when they reach zero. Computed from the counters before and after one
change, so each crossing is reported once, and a rise above the threshold re-arms it by
construction. Charges detect their crossing inside their one statement (accounts/hot/writer.py);
every other change calls `record_balance_events`.

Balances (issue 23): this module only READS them (the counters of the row its caller changed,
to tell a crossing); the one account column it writes is `event_sequence`, no balance, so it
is not a movement of uses and stays outside the money core (src/ciris_billing/ledger/).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import LOW_BALANCE_THRESHOLD_SETTING, accounts, events, new_id, utcnow
from ciris_billing.errors import AccountNotFound

ACCOUNT_CREATED = "account.created"
BALANCE_LOW = "balance.low"
BALANCE_DEPLETED = "balance.depleted"
PURCHASE_SUCCEEDED = "purchase.succeeded"
PURCHASE_FAILED = "purchase.failed"
REFUND_SUCCEEDED = "refund.succeeded"
DISPUTE_OPENED = "dispute.opened"
DISPUTE_CLOSED = "dispute.closed"
RESERVATION_EXPIRED = "reservation.expired"
CREDITS_EXPIRING = "credits.expiring"
CREDITS_EXPIRED = "credits.expired"
AUTO_TOPUP_SUCCEEDED = "auto_topup.succeeded"
AUTO_TOPUP_FAILED = "auto_topup.failed"
AUTO_TOPUP_REQUIRES_ACTION = "auto_topup.requires_action"
ENDPOINT_DISABLED = "endpoint.disabled"

# Every type an endpoint can subscribe to (its `events` filter names some of these).
EVENT_TYPES = (
    ACCOUNT_CREATED,
    BALANCE_LOW,
    BALANCE_DEPLETED,
    PURCHASE_SUCCEEDED,
    PURCHASE_FAILED,
    REFUND_SUCCEEDED,
    DISPUTE_OPENED,
    DISPUTE_CLOSED,
    RESERVATION_EXPIRED,
    CREDITS_EXPIRING,
    CREDITS_EXPIRED,
    AUTO_TOPUP_SUCCEEDED,
    AUTO_TOPUP_FAILED,
    AUTO_TOPUP_REQUIRES_ACTION,
    ENDPOINT_DISABLED,
)

# LOW_BALANCE_THRESHOLD_USES reaches SQL as a setting of every connection the service opens
# (db.session_settings): the charge statement, and any other, reads an account's threshold as
# this expression, without a parameter or a round trip. A connection without it (psql) gets 3.
# The default applies only to accounts past the free plan (plan_name 'free' until the first
# paid uses: accounts/service.py FREE_PLAN): with it equal to the free uses, every new user's
# first use fired balance.low. An account's own threshold applies whatever its plan. Safe
# within one statement: a charge or hold never changes plan_name, so the threshold its SET
# compares with is the one RETURNING gives the outbox CTE.
DEFAULT_THRESHOLD = 3
THRESHOLD_SQL = (
    f"COALESCE(low_balance_threshold_uses, CASE WHEN plan_name = 'free' THEN 0 ELSE "
    f"COALESCE(NULLIF(current_setting('{LOW_BALANCE_THRESHOLD_SETTING}', true), '')::bigint, "
    f"{DEFAULT_THRESHOLD}) END)"
)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    id: str
    type: str
    account_id: str | None
    sequence: int | None
    data: dict[str, Any]


async def record_event(
    conn: AsyncConnection, account_id: str | None, type: str, data: Mapping[str, Any]
) -> RecordedEvent:
    """Write one event in the caller's transaction (never commits). With an account, the
    delivered `data` also carries `account_id`, `oauth_provider`, `external_id` and the
    account's next `sequence` (AccountNotFound if there is no such account)."""
    now = utcnow()
    body = dict(data)
    sequence: int | None = None
    if account_id is not None:
        # Safe: the UPDATE takes the account's row lock, so two events of one account can never
        # take one number (and the unique (account_id, sequence) would refuse it anyway).
        account = (
            await conn.execute(
                accounts.update()
                .where(accounts.c.id == account_id)
                .values(event_sequence=accounts.c.event_sequence + 1)
                .returning(
                    accounts.c.event_sequence, accounts.c.oauth_provider, accounts.c.external_id
                )
            )
        ).first()
        if account is None:
            raise AccountNotFound(f"No account {account_id}")
        sequence = int(account.event_sequence)
        body = {
            "account_id": account_id,
            "oauth_provider": account.oauth_provider,
            "external_id": account.external_id,
            "sequence": sequence,
            **body,
        }
    event_id = new_id("evt")
    await conn.execute(
        events.insert().values(
            id=event_id,
            account_id=account_id,
            sequence=sequence,
            type=type,
            data=body,
            created_at=now,
        )
    )
    return RecordedEvent(event_id, type, account_id, sequence, body)


def balance_data(account: Any, threshold: int) -> dict[str, Any]:
    """A balance event's own data (the charge statement builds the same keys in SQL)."""
    row = account._mapping if hasattr(account, "_mapping") else account
    free, paid = int(row["free_uses_remaining"]), int(row["paid_uses_remaining"])
    return {
        "available_uses": free + paid,
        "free_uses_remaining": free,
        "paid_uses_remaining": paid,
        "threshold_uses": threshold,
    }


def crossings(before: int, after: int, threshold: int) -> list[str]:
    """The balance events of available uses going from `before` to `after` (low first)."""
    crossed = []
    if before >= threshold > after:
        crossed.append(BALANCE_LOW)
    if before > 0 and after == 0:
        crossed.append(BALANCE_DEPLETED)
    return crossed


async def threshold_of(conn: AsyncConnection, account_id: str) -> int:
    """The account's balance.low threshold (its own, else the setting's)."""
    value = await conn.scalar(
        select(text(THRESHOLD_SQL)).select_from(accounts).where(accounts.c.id == account_id)
    )
    return int(value if value is not None else DEFAULT_THRESHOLD)


async def record_available_change(
    conn: AsyncConnection, account: Any, change: int
) -> list[RecordedEvent]:
    """`record_balance_events` for a change that moved available uses by `change` (the
    account's row after it: id, free_uses_remaining, paid_uses_remaining)."""
    row = account._mapping if hasattr(account, "_mapping") else account
    after = int(row["free_uses_remaining"]) + int(row["paid_uses_remaining"])
    return await record_balance_events(conn, account, after - change)


async def record_balance_events(
    conn: AsyncConnection, account: Any, before_available: int
) -> list[RecordedEvent]:
    """After a change of an account's counters (its row after the change, locked by the
    caller's transaction) from `before_available` available uses: the balance events it
    crossed, recorded. Nothing to do (and no query) when available uses did not go down."""
    row = account._mapping if hasattr(account, "_mapping") else account
    after = int(row["free_uses_remaining"]) + int(row["paid_uses_remaining"])
    if after >= before_available:
        return []
    threshold = await threshold_of(conn, row["id"])
    return [
        await record_event(conn, row["id"], kind, balance_data(row, threshold))
        for kind in crossings(before_available, after, threshold)
    ]
