"""Issue 24 item 6: the catalog's CLI twins (packs, plans, promotion codes, an account's plan),
each change an audit row with door 'cli', and what they make is what the API sees."""

from __future__ import annotations

import json
import os

from tests.catalog.support import audit_rows
from tests.support.api import Api
from tests.support.cli import cli
from tests.support.flows import BUYER, check


async def test_packs_plans_and_codes_from_the_cli(api: Api) -> None:
    env = {**os.environ, "DATABASE_URL": api.database_url}
    made = cli(
        env, "packs", "create", "pro-eur", "--name", "100 uses", "--uses", "100",
        "--price-minor", "2000", "--currency", "eur", "--expires-in-days", "30",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["currency"] == "EUR"
    archived = cli(env, "packs", "update", "pro-eur", "--archive")
    assert archived.returncode == 0, archived.stderr
    assert json.loads(archived.stdout)["active"] is False
    listed = json.loads(cli(env, "packs", "list").stdout)["packs"]
    assert [(p["pack_id"], p["active"]) for p in listed] == [("default", True), ("pro-eur", False)]
    api_listed = (await api.get("/v1/billing/packs")).json()["packs"]
    assert api_listed == listed
    bad = cli(env, "packs", "create", "x", "--name", "n", "--uses", "0", "--price-minor", "1",
              "--currency", "USD")  # fmt: skip
    assert bad.returncode != 0

    plan = cli(env, "plans", "create", "pro", "--free-uses", "10", "--free-uses-reset",
               "monthly", "--pack-ids", "default,pro-eur")  # fmt: skip
    assert plan.returncode == 0, plan.stderr
    assert json.loads(plan.stdout)["pack_ids"] == ["default", "pro-eur"]
    assert cli(env, "plans", "update", "pro", "--free-uses", "12").returncode == 0
    assert [p["name"] for p in json.loads(cli(env, "plans", "list").stdout)["plans"]] == [
        "free",
        "pro",
    ]
    await check(api)  # the account exists
    moved = cli(env, "account-plan", "oauth:google/buyer@example.com", "--plan", "pro")
    assert moved.returncode == 0, moved.stderr
    assert json.loads(moved.stdout)["plan_name"] == "pro"
    assert (await check(api, BUYER))["plan_name"] == "pro"
    assert (
        cli(env, "account-plan", "oauth:google/buyer@example.com", "--plan", "nope").returncode == 1
    )

    code = cli(env, "promotion-codes", "create", "HALF", "--percent-off", "50",
               "--max-redemptions", "3", "--once-per-account")  # fmt: skip
    assert code.returncode == 0, code.stderr
    off = cli(env, "promotion-codes", "update", "HALF", "--deactivate")
    assert json.loads(off.stdout)["active"] is False
    codes = json.loads(cli(env, "promotion-codes", "list").stdout)["promotion_codes"]
    assert [(c["code"], c["percent_off"], c["active"]) for c in codes] == [("HALF", 50, False)]
    assert cli(env, "promotion-codes", "create", "BAD").returncode != 0

    for action in (
        "pack_create", "pack_update", "plan_create", "plan_update", "account_plan",
        "promotion_code_create", "promotion_code_update",
    ):  # fmt: skip
        rows = await audit_rows(api, action)
        assert [row.door for row in rows] == ["cli"], action
    assert (await api.audit()).clean
