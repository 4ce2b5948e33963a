"""Issue 21 finding 10: every operator action is an audit-trail row, whatever the door: the API
(the admin key's name and id), the CLI (the operating-system user) and the console (the
signed-in key's name), written in the action's transaction; the console's audit page and
`ciris-billing audit-log` show them with their door. A grant's ledger row carries the key."""

from __future__ import annotations

import getpass
import json
from typing import Any

from sqlalchemy import select

from ciris_billing.db import accounts, api_keys, credits
from tests.console.test_console_actions import USER, account_of, console  # noqa: F401
from tests.support.api import Api
from tests.support.cli import cli
from tests.support.console import Console, trail
from tests.support.flows import paid_purchase
from tests.support.servers import service_env

ACCOUNT = f"/v1/billing/accounts/{USER['oauth_provider']}/{USER['external_id']}"


async def key_id(api: Api, scope: str = "admin") -> Any:
    async with api.engine.connect() as conn:
        rows = list(await conn.execute(select(api_keys.c.id, api_keys.c.name, api_keys.c.scopes)))
    [row] = [r for r in rows if r.scopes == scope]
    return row


async def test_finding10_api_actions_are_audited_with_the_key(api: Api) -> None:
    admin = await key_id(api)
    bought = await paid_purchase(api, USER)
    key = {"Idempotency-Key": "grant-1"}
    grant = {**USER, "uses": 5, "reason": "support"}
    assert (await api.post("/v1/billing/credits", grant, scope="admin", **key)).status_code == 201
    replay = await api.post("/v1/billing/credits", grant, scope="admin", **key)
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert (await api.post(f"{ACCOUNT}/suspend", {"reason": "x"}, scope="admin")).is_success
    assert (await api.post(f"{ACCOUNT}/reactivate", {}, scope="admin")).is_success
    threshold = await api.http.put(
        f"{ACCOUNT}/low_balance_threshold", json={"uses": 1}, headers=api.headers("admin")
    )
    assert threshold.status_code == 200
    refunded = await api.post(
        f"/v1/billing/purchases/{bought['payment_id']}/refund", {"amount_minor": 100}, "admin"
    )
    assert refunded.status_code == 201, refunded.text

    rows = await trail(api.engine)
    account = await account_of(api)
    assert [(r.action, r.door, r.actor, r.api_key_id) for r in rows] == [
        (action, "api", admin.name, admin.id)
        for action in ("grant", "suspend", "reactivate", "low_balance_threshold", "refund")
    ], "one row each: the replay wrote none"
    assert {r.account_id for r in rows} == {account.id}
    assert (rows[0].before["paid_uses"], rows[0].after["paid_uses"]) == (20, 25)
    assert (rows[1].before["status"], rows[1].after["status"]) == ("active", "suspended")
    async with api.engine.connect() as conn:
        granted = (await conn.execute(select(credits).where(credits.c.kind == "grant"))).one()
    assert granted.api_key_id == admin.id
    assert (await api.audit()).clean


async def test_finding10_a_failed_action_leaves_no_row(api: Api) -> None:
    await paid_purchase(api, USER)
    too_much = {**USER, "uses": -1000, "reason": "x"}
    refused = await api.post("/v1/billing/credits", too_much, scope="admin")
    assert refused.status_code in (409, 422), refused.text
    assert await trail(api.engine) == []


async def test_finding10_cli_actions_are_audited_with_the_user(api: Api) -> None:
    await paid_purchase(api, USER)
    env = service_env(api.database_url)
    provider, external = USER["oauth_provider"], USER["external_id"]
    granted = cli(env, "grant", provider, external, "--uses", "3", "--reason", "cli")
    assert granted.returncode == 0, granted.stderr
    assert cli(env, "suspend", provider, external, "--reason", "x").returncode == 0
    assert cli(env, "reactivate", provider, external).returncode == 0
    assert cli(env, "low-balance-threshold", provider, external, "2").returncode == 0
    made = cli(env, "keys", "create", "--name", "ops", "--scopes", "read")
    assert made.returncode == 0, made.stderr

    rows = await trail(api.engine)
    assert [(r.action, r.door, r.actor, r.api_key_id) for r in rows] == [
        (action, "cli", getpass.getuser(), None)
        for action in ("grant", "suspend", "reactivate", "low_balance_threshold", "create_key")
    ]
    printed = cli(env, "audit-log", "--door", "cli", "--json")
    assert printed.returncode == 0, printed.stderr
    lines = [json.loads(line) for line in printed.stdout.splitlines()]
    assert [line["action"] for line in lines] == [
        "create_key",
        "low_balance_threshold",
        "reactivate",
        "suspend",
        "grant",
    ]
    assert {line["door"] for line in lines} == {"cli"}
    assert (await api.audit()).clean


async def test_finding10_every_door_in_one_trail_console_and_audit_log(
    api: Api,
    console: Console,  # noqa: F811
) -> None:
    await paid_purchase(api, USER)
    account = await account_of(api)
    grant = {**USER, "uses": 1, "reason": "api"}
    assert (await api.post("/v1/billing/credits", grant, scope="admin")).status_code == 201
    env = service_env(api.database_url)
    provider, external = USER["oauth_provider"], USER["external_id"]
    assert cli(env, "grant", provider, external, "--uses", "1", "--reason", "c").returncode == 0
    done = await console.act("grant", {"account_id": account.id, "uses": "1", "reason": "web"})
    assert done.status_code == 303

    assert [r.door for r in await trail(api.engine, account.id)] == ["api", "cli", "console"]
    page = await api.http.get(f"/console/accounts/{account.id}")
    assert page.status_code == 200
    for door in ("(api)", "(cli)", "(console)"):
        assert door in page.text
    printed = cli(env, "audit-log", "--account", account.id)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.strip().splitlines()
    assert [line.rsplit("(by ", 1)[1] for line in lines] == ["console)", "cli)", "api)"]
    async with api.engine.connect() as conn:
        paid = await conn.scalar(
            select(accounts.c.paid_uses_remaining).where(accounts.c.id == account.id)
        )
    assert paid == 23
    assert (await api.audit()).clean
