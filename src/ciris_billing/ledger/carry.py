"""Rated usage in SQL: a feature's quantity turned into uses on the locked account row.

A rate (rates/service.py) says how many units of a feature make one use. With `up` rounding
each request rounds up by itself (uses = ceil(quantity / units), computed in Python: the
plain statements take it). With `carry` the account keeps, per feature, the quantity charged
that has not yet made a whole use, in its row's `carry_features` / `carry_left` (parallel
arrays): the charge statement takes `(carried + quantity) / units` uses and keeps
`(carried + quantity) % units`, both computed from the locked row in the same UPDATE. Under
READ COMMITTED PostgreSQL re-checks a row another statement changed meanwhile (EvalPlanQual)
with the row's new columns, so concurrent charges of one feature carry exactly (100 charges of
300 units at 1,000 units per use take 30 uses), and the remainder is durable with the row.

These helpers render the pieces; statements.py puts them in the `carry` variants of the
charge texts (the plain texts do not change). The `carry` head text makes every charge whose
uses the head lot covers, 0 included (the remainder kept, no lot named): one statement, one
round trip, for the common case of a charge below one use.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from ciris_billing.db import accounts


def carry_slot(row: str, feature: str) -> str:
    """SQL: the feature's slot in the account's carry arrays (NULL when never charged)."""
    return f"array_position({row}carry_features, {feature})"


def carry_total(row: str, feature: str, quantity: str) -> str:
    """SQL: what was carried for the feature plus this request's quantity (units)."""
    return f"(coalesce({row}carry_left[{carry_slot(row, feature)}], 0) + {quantity})"


def carry_uses(row: str, feature: str, quantity: str, units: str) -> str:
    """SQL: the whole uses the carried and new units make (what the charge takes)."""
    return f"({carry_total(row, feature, quantity)} / {units})"


def carry_assignment(row: str, feature: str, quantity: str, units: str) -> str:
    """SQL (two SET items): the remainder kept in the feature's slot; a feature charged for
    the first time gets the next slot (assigning one past the end extends an array)."""
    slot = f"coalesce({carry_slot(row, feature)}, cardinality({row}carry_features) + 1)"
    return (
        f"carry_features[{slot}] = {feature},\n"
        f"        carry_left[{slot}] = {carry_total(row, feature, quantity)} % {units}"
    )


def taken_uses(row: str, head: bool) -> str:
    """SQL (RETURNING): the uses a `carry` statement took, read back from the movement's lots
    (RETURNING sees the new carry, so the expression above no longer gives them)."""
    if head:  # none when the charge completed no use (its movement names no lot)
        return f"coalesce({row}last_lot_uses[1], 0)"
    return f"(SELECT sum(t)::bigint FROM unnest({row}last_lot_uses) t)"  # noqa: S608


async def take_carried(
    conn: AsyncConnection, account_id: str, feature: str, quantity: int, units: int
) -> int:
    """Outside the hot statements (a `carry` hold's capture, accounts/reservations.py): add
    `quantity` to the account's remainder of `feature`, keep what makes no whole use, and
    return the uses completed (the caller takes them). The same arithmetic as the charge's SQL
    above, on the row locked here."""
    # Safe: the account's row is locked (FOR UPDATE) until the transaction ends, so the carry
    # read here is the one written below; concurrent charges of the feature wait for it.
    row = (
        await conn.execute(
            select(accounts.c.carry_features, accounts.c.carry_left)
            .where(accounts.c.id == account_id)
            .with_for_update()
        )
    ).one()
    features, left = list(row.carry_features), [int(n) for n in row.carry_left]
    if feature not in features:
        features.append(feature)
        left.append(0)
    slot = features.index(feature)
    completed, left[slot] = divmod(left[slot] + quantity, units)
    await conn.execute(
        accounts.update()
        .where(accounts.c.id == account_id)
        .values(carry_features=features, carry_left=left)
    )
    return completed
