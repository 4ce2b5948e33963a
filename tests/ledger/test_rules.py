"""One consumption rule (issue 23): the database's walk is ledger/functions.py's, every hot
statement is rendered from rules.py's clauses, and a charge made alone and the same charge made
in a batch leave the same wallet."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text

from ciris_billing.accounts.hot.pool import StatementPool
from ciris_billing.ledger import capture_statements, statements
from ciris_billing.ledger.functions import FUNCTIONS
from ciris_billing.ledger.holds import consume
from ciris_billing.ledger.rules import (
    can_take,
    free_period_current,
    head_assignment,
    head_covers,
    touched_lots,
    walk_assignment,
)
from tests.ledger.support import account_row, account_with, books_problems, charge, random_mix
from tests.support.api import Api

NOW = datetime(2026, 12, 7, 12, tzinfo=UTC)


async def test_the_database_walks_with_the_functions_the_code_defines(api: Api) -> None:
    async with api.engine.connect() as conn:
        held = {
            row.proname: row.prosrc
            for row in await conn.execute(
                text("SELECT proname, prosrc FROM pg_proc WHERE proname LIKE 'ledger\\_%'")
            )
        }
    assert held == {name: body for name, _arguments, _returns, body in FUNCTIONS}


# (statement, the row alias, its uses, its time) for every statement that takes from lots.
HOT = {
    "charge": (statements.charge_sql, "", "$3::bigint", "$11::timestamptz"),
    "charge batch": (statements.charge_batch_sql, "a.", "i.uses", "i.created_at"),
    "hold": (statements.hold_sql, "a.", "$3::bigint", "$7::timestamptz"),
    "hold batch": (statements.hold_batch_sql, "a.", "i.uses", "i.at"),
}


@pytest.mark.parametrize("name", HOT)
@pytest.mark.parametrize("monthly", [False, True])
def test_every_hot_statement_is_rendered_from_the_rule(name: str, monthly: bool) -> None:
    render, row, uses, at = HOT[name]
    sql = render(monthly)
    assert can_take(row, uses, at) in sql
    assert walk_assignment(row, uses, at, hold=name.startswith("hold")) in sql
    assert touched_lots(row) in sql  # the movement row names its lots (rules.touched_lots)
    assert free_period_current(row, at, everyone=monthly) in sql
    # One statement: the walk appears once, no other take of uses.
    assert sql.count("ledger_take(") == 1
    assert "ledger_walk(" not in sql
    assert "ledger_touched(" not in sql
    assert "LEAST(" not in sql.split("alerted AS")[0]  # the old free-first arithmetic is gone


HEAD = {
    "charge": (statements.charge_sql, "", "$3::bigint", "$11::timestamptz"),
    "charge batch": (statements.charge_batch_sql, "a.", "i.uses", "i.created_at"),
    "hold": (statements.hold_sql, "a.", "$3::bigint", "$7::timestamptz"),
    "hold batch": (statements.hold_batch_sql, "a.", "i.uses", "i.at"),
}


@pytest.mark.parametrize("name", HEAD)
@pytest.mark.parametrize("monthly", [False, True])
def test_the_head_texts_are_the_walks_common_case_without_a_function(
    name: str, monthly: bool
) -> None:
    render, row, uses, at = HEAD[name]
    sql = render(monthly, head=True)
    assert head_covers(row, uses, at) in sql
    assert head_assignment(row, uses, hold=name.startswith("hold")) in sql
    assert touched_lots(row) in sql
    assert free_period_current(row, at, everyone=monthly) in sql
    # No walk, no availability function: only the answer's ledger_usable past an expiry.
    assert "ledger_take(" not in sql
    assert "ledger_available(" not in sql
    assert "ledger_walk(" not in sql
    assert "ledger_touched(" not in sql


async def test_the_wallet_walk_is_the_capture_walk_with_the_touched_lots(api: Api) -> None:
    """ledger_take (the account's wallet) and ledger_walk (a hold's lots) are one walk: over
    random wallets, the same new wallet, the same split, and ledger_take's lots are exactly
    those ledger_walk took from, in order."""
    rng = random.Random(2323)
    at = NOW
    async with api.engine.connect() as conn:
        for _ in range(300):
            slots = rng.randint(0, 6)
            left = [rng.choice([0, 0, 1, 2, 5]) for _ in range(slots)]
            kinds = [rng.randint(0, 2) for _ in range(slots)]
            expires = [
                rng.choice([None, None, at - timedelta(seconds=1), at, at + timedelta(hours=1)])
                for _ in range(slots)
            ]
            ids = [f"lot_{i}" for i in range(slots)]
            uses = rng.randint(1, 8)
            values = {
                "ids": ids,
                "left": left,
                "kinds": kinds,
                "expires": expires,
                "uses": uses,
                "at": at,
            }
            walked = (
                await conn.execute(
                    text(
                        "SELECT * FROM ledger_walk(CAST(:left AS bigint[]), "
                        "CAST(:kinds AS smallint[]), CAST(:expires AS timestamptz[]), "
                        ":uses, :at)"
                    ),
                    values,
                )
            ).one()
            took = (
                await conn.execute(
                    text(
                        "SELECT * FROM ledger_take(CAST(:ids AS varchar[]), "
                        "CAST(:left AS bigint[]), CAST(:kinds AS smallint[]), "
                        "CAST(:expires AS timestamptz[]), :uses, :at)"
                    ),
                    values,
                )
            ).one()
            if walked.new_left is None:
                assert took.new_left is None, values
                continue
            touched = [i for i, part in enumerate(walked.taken) if part]
            assert list(took.new_left) == list(walked.new_left), values
            assert list(took.ids) == [ids[i] for i in touched], values
            assert list(took.kinds) == [kinds[i] for i in touched], values
            assert list(took.taken) == [walked.taken[i] for i in touched], values
            assert (took.free_taken, took.other_taken) == (
                walked.free_taken,
                walked.other_taken,
            )


async def test_the_head_text_makes_what_the_walk_makes_whenever_it_makes_a_row(
    api: Api, statement_pool: StatementPool
) -> None:
    """Two accounts with the same random lots: the head text on one, the walk on the other.
    Whenever the head text makes a charge, the walk makes the same (lots, uses, wallet,
    counters); when it makes none, the walk either makes none or takes from something else
    than the head lot alone (the uses span lots, or the head lot has expired)."""
    rng = random.Random(9)
    for case in range(30):
        mix = random_mix(rng, NOW)
        head = await account_with(api.engine, f"head-{case}", mix, NOW - timedelta(hours=1))
        walk = await account_with(api.engine, f"walk-{case}", mix, NOW - timedelta(hours=1))
        for step in range(6):
            uses = rng.randint(1, 4)
            at = NOW + timedelta(minutes=step)
            before = await account_row(api.engine, walk)
            fast = await statement_pool.fetch_one(
                statements.CHARGE_HEAD_SQL, charge(f"head-{case}", uses, at).parameters()
            )
            walked = await statement_pool.fetch_one(
                statements.CHARGE_SQL, charge(f"walk-{case}", uses, at).parameters()
            )
            if fast is None:
                if walked is None:
                    continue
                # The head text declined a charge the walk made: the head lot could not give
                # all of it. Make it on the first account too, to go on from the same wallet.
                k = 0 if before.lot_left and before.lot_left[0] > 0 else 1
                head_lot = before.lot_ids[k] if k < len(before.lot_ids) else None
                assert list(walked["lot_ids"]) != [head_lot] or (
                    before.lot_expires[k] is not None and before.lot_expires[k] <= at
                ), (case, step)
                fast = await statement_pool.fetch_one(
                    statements.CHARGE_SQL, charge(f"head-{case}", uses, at).parameters()
                )
            assert walked is not None, (case, step)
            assert fast is not None, (case, step)
            assert list(fast["lot_uses"]) == list(walked["lot_uses"])
            assert [i.split("_")[0] for i in fast["lot_ids"]] == [
                i.split("_")[0] for i in walked["lot_ids"]
            ]
            assert fast["last_charge_free_uses"] == walked["last_charge_free_uses"]
            first = await account_row(api.engine, head)
            second = await account_row(api.engine, walk)
            assert list(first.lot_left) == list(second.lot_left), (case, step)
            assert (first.free_uses_remaining, first.paid_uses_remaining) == (
                second.free_uses_remaining,
                second.paid_uses_remaining,
            )
    assert await books_problems(api.engine) == []


def test_captures_spend_the_holds_lots_without_expiry_and_give_back_the_rest() -> None:
    for sql in (capture_statements.CAPTURE_SQL, capture_statements.CAPTURE_BATCH_SQL):
        assert "ledger_walk(l.lot_uses, l.lot_kinds, NULL::timestamptz[]" in sql
        assert "ledger_give_back(a.lot_ids, a.lot_left, s.lot_ids, s.given)" in sql


async def test_the_capture_walk_in_python_is_the_databases(api: Api) -> None:
    rng = random.Random(23)
    async with api.engine.connect() as conn:
        for _ in range(100):
            held = [rng.randint(0, 5) for _ in range(rng.randint(1, 6))]
            uses = rng.randint(0, sum(held))
            row = (
                await conn.execute(
                    text(
                        "SELECT taken, new_left FROM ledger_walk(CAST(:held AS bigint[]), "
                        "CAST(:kinds AS smallint[]), NULL, :uses, now())"
                    ),
                    {"held": held, "kinds": [2] * len(held), "uses": uses},
                )
            ).one()
            assert consume(held, uses) == (list(row.taken), list(row.new_left))


async def test_a_charge_alone_and_in_a_batch_leave_the_same_wallet(
    api: Api, statement_pool: StatementPool
) -> None:
    rng = random.Random(7)
    for case in range(30):
        mix = random_mix(rng, NOW)
        alone = await account_with(api.engine, f"alone-{case}", mix, NOW - timedelta(hours=1))
        batched = await account_with(api.engine, f"batched-{case}", mix, NOW - timedelta(hours=1))
        other = await account_with(api.engine, f"other-{case}", mix, NOW - timedelta(hours=1))
        for step in range(4):
            uses = rng.randint(1, 4)
            at = NOW + timedelta(minutes=step)
            one = await statement_pool.fetch_one(
                statements.CHARGE_SQL, charge(f"alone-{case}", uses, at).parameters()
            )
            members = [charge(f"batched-{case}", uses, at), charge(f"other-{case}", 1, at)]
            columns = [list(c) for c in zip(*(m.parameters() for m in members), strict=True)]
            rows = await statement_pool.fetch_all(statements.CHARGE_BATCH_SQL, columns)
            made = {row["charge_id"]: row for row in rows}
            twin = made.get(members[0].charge_id)
            assert (one is None) == (twin is None), (case, step)
            if one is not None and twin is not None:
                assert list(one["lot_uses"]) == list(twin["lot_uses"])
                assert one["last_charge_free_uses"] == twin["last_charge_free_uses"]
        first = await account_row(api.engine, alone)
        second = await account_row(api.engine, batched)
        assert list(first.lot_left) == list(second.lot_left)
        assert list(first.lot_kinds) == list(second.lot_kinds)
        assert (first.free_uses_remaining, first.paid_uses_remaining) == (
            second.free_uses_remaining,
            second.paid_uses_remaining,
        )
        assert other
    assert await books_problems(api.engine) == []
