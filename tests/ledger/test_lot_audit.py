"""Issue 23, item 3: `audit` checks every lot (ledger/lot_audit.py), and says so in
`(await api.audit()).clean` and in `ciris-billing audit`. Each breach is made by hand here
(what no code path does) and found."""

from __future__ import annotations

from sqlalchemy import text

from tests.support.api import Api, identity
from tests.support.cli import cli
from tests.support.flows import paid_purchase
from tests.support.servers import service_env

USER = identity("lot-audit@example.com")


async def problems(api: Api) -> set[str]:
    return {finding.problem for finding in (await api.audit()).lot_findings}


async def corrupt(api: Api, sql: str) -> None:
    async with api.engine.begin() as conn:
        await conn.execute(text(sql), {"e": USER["external_id"]})


async def test_a_lot_with_uses_no_movement_explains_is_found(api: Api) -> None:
    await paid_purchase(api, USER)
    assert (await api.audit()).clean
    await corrupt(
        api,
        "UPDATE accounts SET lot_left[2] = lot_left[2] + 1, "
        "paid_uses_remaining = paid_uses_remaining + 1 WHERE external_id = :e",
    )
    report = await api.audit()
    assert not report.clean
    assert "lot_left_mismatch" in await problems(api)

    audited = cli(service_env(api.database_url), "audit", "--ledger-only")
    assert audited.returncode == 1
    assert "LOT lot_left_mismatch" in audited.stdout


async def test_counters_that_are_not_the_wallet_are_found(api: Api) -> None:
    await paid_purchase(api, USER)
    await corrupt(api, "UPDATE accounts SET lot_left[1] = 0 WHERE external_id = :e")
    assert {"counters_not_wallet", "lot_left_mismatch"} <= await problems(api)


async def test_a_wallet_out_of_order_or_holding_a_closed_lot_is_found(api: Api) -> None:
    await paid_purchase(api, USER)
    await corrupt(
        api,
        "UPDATE accounts SET lot_ids = ARRAY[lot_ids[2], lot_ids[1]], "
        "lot_left = ARRAY[lot_left[2], lot_left[1]], lot_kinds = ARRAY[lot_kinds[2], "
        "lot_kinds[1]] WHERE external_id = :e",
    )
    assert await problems(api) == {"wallet_out_of_order"}
    await corrupt(
        api,
        "UPDATE lots SET status = 'used' WHERE kind = 'free' AND account_id = "
        "(SELECT id FROM accounts WHERE external_id = :e)",
    )
    assert "closed_lot_in_wallet" in await problems(api)


async def test_an_open_lot_missing_from_the_wallet_is_found(api: Api) -> None:
    await paid_purchase(api, USER)
    await corrupt(
        api,
        "UPDATE accounts SET lot_ids = lot_ids[1:1], lot_left = lot_left[1:1], "
        "lot_kinds = lot_kinds[1:1], lot_expires = lot_expires[1:1], "
        "paid_uses_remaining = 0 WHERE external_id = :e",
    )
    assert "active_lot_not_in_wallet" in await problems(api)
