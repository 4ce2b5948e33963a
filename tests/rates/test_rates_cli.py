"""`ciris-billing rates list|set`: the CLI twin of the rates API, audited."""

from __future__ import annotations

import os

from sqlalchemy import select

from ciris_billing.db import audit_trail
from tests.support.api import Api, identity
from tests.support.cli import cli


async def test_rates_set_and_list_from_the_cli(api: Api) -> None:
    env = {**os.environ, "DATABASE_URL": api.database_url}
    made = cli(
        env, "rates", "set", "gpt-4o-tokens", "--units-per-use", "1000", "--rounding", "carry"
    )
    assert made.returncode == 0, made.stderr
    assert "gpt-4o-tokens: 1000 units/use, carry" in made.stdout
    again = cli(env, "rates", "set", "gpt-4o-tokens", "--units-per-use", "250", "--rounding", "up")
    assert again.returncode == 0, again.stderr
    listed = cli(env, "rates", "list")
    assert listed.returncode == 0, listed.stderr
    assert "gpt-4o-tokens  250 units/use  up" in listed.stdout
    bad = cli(env, "rates", "set", "Bad Name", "--units-per-use", "3", "--rounding", "up")
    assert bad.returncode != 0
    async with api.engine.connect() as conn:
        rows = list(
            await conn.execute(
                select(audit_trail.c.door, audit_trail.c.after)
                .where(audit_trail.c.action == "set_rate")
                .order_by(audit_trail.c.created_at)
            )
        )
    assert [(r.door, r.after["units_per_use"]) for r in rows] == [("cli", 1000), ("cli", 250)]
    # The API sees it (a feature unknown to the book is looked up at once).
    user = identity("cli-rated@example.com")
    await api.post("/v1/billing/accounts", {**user, "initial_balance_minor": 5}, scope="admin")
    answer = await api.post(
        "/v1/billing/charges", {**user, "feature": "gpt-4o-tokens", "quantity": 600}
    )
    assert answer.status_code == 201
    assert answer.json()["uses"] == 3
    listed_api = (await api.get("/v1/billing/rates")).json()["rates"]
    assert [(r["feature"], r["units_per_use"]) for r in listed_api] == [("gpt-4o-tokens", 250)]
    assert (await api.audit()).clean
