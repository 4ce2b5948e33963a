"""Helpers of the money core's tests: accounts with lots of any mix (ledger.wallet.add_lot, in
a transaction, as a grant would), their wallets, and the books checked lot by lot."""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from ciris_billing.accounts.hot.writer import ChargeAttempt
from ciris_billing.accounts.service import Identity, NewAccount, ensure_account
from ciris_billing.db import accounts, lots, new_id
from ciris_billing.ledger.rules import LOT_KINDS, consumption_key
from ciris_billing.ledger.wallet import Credit, NewLot, add_lot
from ciris_billing.pricing import Pricing

NO_FREE_USES = Pricing(0, 20, 500, "USD")
SOURCE = {"free": "free_grant", "promotional": "grant", "paid": "purchase"}
CREDIT = {"free": "free_grant", "promotional": "grant", "paid": "grant"}


def who(name: str) -> Identity:
    return Identity("oauth:google", f"{name}@ledger.example")


async def account_with(
    engine: AsyncEngine, name: str, mix: list[NewLot], at: datetime, pricing: Pricing = NO_FREE_USES
) -> str:
    """A new account (no free uses of its own) holding these lots, granted at `at` (the n-th a
    millisecond later than the one before: no two lots of an account tie in the order)."""
    async with engine.begin() as conn:
        account, _ = await ensure_account(conn, who(name), pricing, NewAccount())
        for n, lot in enumerate(mix):
            credit = Credit(kind=CREDIT[lot.kind], currency="USD")
            await add_lot(conn, account.id, lot, credit, at=at + timedelta(milliseconds=n))
        return str(account.id)


def random_mix(rng: random.Random, now: datetime, lots_at_most: int = 5) -> list[NewLot]:
    """1..lots_at_most lots of random kind, size, priority and expiry (some already expired)."""
    mix = []
    for _ in range(rng.randint(1, lots_at_most)):
        kind = rng.choice(LOT_KINDS)
        expiry = rng.choice([None, None, -3600, 60, 3600, 7200])
        mix.append(
            NewLot(
                kind=kind,
                uses=rng.randint(1, 6),
                source=SOURCE[kind],
                priority=rng.choice([50, 100, 100, 200]),
                expires_at=None if expiry is None else now + timedelta(seconds=expiry),
                amount_minor=100 if kind == "paid" else 0,
            )
        )
    return mix


async def account_row(engine: AsyncEngine, account_id: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(accounts).where(accounts.c.id == account_id))).one()


@dataclass
class RefLot:
    id: str
    kind: str
    left: int
    expires_at: datetime | None
    key: tuple[Any, ...]


async def reference_lots(engine: AsyncEngine, account_id: str) -> list[RefLot]:
    """The account's lots in the consumption order, sorted here by rules.consumption_key (the
    reference the database's wallet order is checked against), with what each has left."""
    row = await account_row(engine, account_id)
    left = dict(zip(row.lot_ids, row.lot_left, strict=True))
    async with engine.connect() as conn:
        found = list(await conn.execute(select(lots).where(lots.c.account_id == account_id)))
    ordered = [
        RefLot(
            lot.id,
            lot.kind,
            int(left.get(lot.id, 0)),
            lot.expires_at,
            consumption_key(lot.priority, lot.expires_at, lot.kind, lot.created_at, lot.id),
        )
        for lot in found
    ]
    return sorted(ordered, key=lambda lot: lot.key)


def reference_take(ordered: list[RefLot], uses: int, at: datetime) -> list[tuple[str, int]] | None:
    """What the rule takes for `uses` at `at`: (lot, uses) in order; None if not enough.
    Changes `ordered`'s left in place."""
    usable = sum(lot.left for lot in ordered if lot.expires_at is None or lot.expires_at > at)
    if usable < uses:
        return None
    taken = []
    for lot in ordered:
        if uses == 0:
            break
        if lot.left and (lot.expires_at is None or lot.expires_at > at):
            part = min(lot.left, uses)
            lot.left -= part
            uses -= part
            taken.append((lot.id, part))
    return taken


def charge(name: str, uses: int, at: datetime, key: str | None = None) -> ChargeAttempt:
    return ChargeAttempt(
        oauth_provider="oauth:google",
        external_id=f"{name}@ledger.example",
        uses=uses,
        amount_minor=0,
        currency="USD",
        description=None,
        metadata_json="{}",
        idempotency_key=key,
        fingerprint="fp" if key else None,
        charge_id=new_id("ch"),
        at=at,
        api_key_id="key_ledger_tests",
    )


async def books_problems(engine: AsyncEngine) -> list[str]:
    """Every account's books, lot by lot (issue 23's audit): each lot's left = granted + its
    credits' lot_uses - its charges' lot_uses - what open holds hold of it, between 0 and its
    grant; the counters = the wallet's sums by kind; the reserved ones = open holds' by kind."""
    problems: list[str] = []
    async with engine.connect() as conn:
        moved: dict[str, int] = defaultdict(int)
        for sql, sign in (
            (
                "SELECT unnest(lot_ids) AS id, unnest(lot_uses) AS n FROM credits "
                "WHERE lot_ids IS NOT NULL",
                1,
            ),
            (
                "SELECT unnest(lot_ids) AS id, unnest(lot_uses) AS n FROM charges "
                "WHERE lot_ids IS NOT NULL",
                -1,
            ),
            (
                "SELECT unnest(lot_ids) AS id, unnest(lot_uses) AS n FROM reservations "
                "WHERE status = 'held'",
                -1,
            ),
        ):
            for row in await conn.execute(text(sql)):
                moved[row.id] += sign * int(row.n)
        wallets = {row.id: row for row in await conn.execute(select(accounts))}
        held = {
            row.account_id: row
            for row in await conn.execute(
                text(
                    "SELECT account_id, sum(free_uses_held) AS free, sum(paid_uses_held) AS paid "
                    "FROM reservations WHERE status = 'held' GROUP BY account_id"
                )
            )
        }
        for lot in await conn.execute(select(lots)):
            wallet = wallets[lot.account_id]
            slots = dict(zip(wallet.lot_ids, wallet.lot_left, strict=True))
            left = int(slots.get(lot.id, 0))
            expected = int(lot.uses_granted) + moved[lot.id]
            if left != expected or not 0 <= left <= int(lot.uses_granted):
                problems.append(f"lot {lot.id}: left {left}, movements say {expected}")
        for account in wallets.values():
            free = sum(
                int(u) for u, k in zip(account.lot_left, account.lot_kinds, strict=True) if k == 0
            )
            other = sum(int(u) for u in account.lot_left) - free
            if (free, other) != (account.free_uses_remaining, account.paid_uses_remaining):
                problems.append(f"account {account.id}: wallet {free}+{other} != counters")
            holds = held.get(account.id)
            reserved = (int(holds.free), int(holds.paid)) if holds else (0, 0)
            if reserved != (account.reserved_free_uses, account.reserved_paid_uses):
                problems.append(f"account {account.id}: reserved {reserved} != counters")
    return problems
