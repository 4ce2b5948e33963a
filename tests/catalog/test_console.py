"""Issue 24 item 6, the console's twins: the catalog page lists packs, plans and codes; each
change is a form then a Confirm, recorded in the audit trail (door 'console')."""

from __future__ import annotations

import pytest

from tests.catalog.support import audit_rows
from tests.console.test_console_actions import account_of
from tests.support.api import Api
from tests.support.console import Console
from tests.support.flows import BUYER, check


@pytest.fixture
async def console(api: Api) -> Console:
    signed_in = await Console(api.http).sign_in(api.keys["admin"])
    assert signed_in.status_code == 303
    return Console(api.http)


async def confirmed(console: Console, action: str, fields: dict[str, str]) -> str:
    page = await console.confirmation(action, fields)
    assert page.status_code == 200, page.text
    done = await console.confirm(action, page.text)
    assert done.status_code == 303, done.text
    return str(done.headers["location"])


async def test_the_catalog_page_and_its_actions(api: Api, console: Console) -> None:
    page = await api.http.get("/console/catalog")
    assert page.status_code == 200
    assert "<code>default</code>" in page.text
    assert "<code>free</code>" in page.text

    pack = {"pack_id": "pro-eur", "name": "100 uses", "uses": "100", "price_minor": "2000",
            "currency": "EUR", "expires_in_days": "30"}  # fmt: skip
    page = await console.confirmation("create_pack", pack)
    assert "Add this pack?" in page.text
    assert (await api.get("/v1/billing/packs")).json()["packs"][1:] == []  # nothing before Confirm
    done = await console.confirm("create_pack", page.text)
    assert done.headers["location"].startswith("/console/catalog?notice=aud_")
    assert [p["pack_id"] for p in (await api.get("/v1/billing/packs")).json()["packs"]] == [
        "default", "pro-eur",
    ]  # fmt: skip
    await confirmed(console, "archive_pack", {"pack_id": "pro-eur"})
    assert (await api.get("/v1/billing/packs")).json()["packs"][1]["active"] is False

    plan = {"name": "pro", "free_uses": "10", "free_uses_reset": "monthly", "pack_ids": "default"}
    await confirmed(console, "create_plan", plan)
    await check(api)
    account_id = (await account_of(api, BUYER)).id
    where = await confirmed(console, "account_plan", {"account_id": account_id, "plan_name": "pro"})
    assert where.startswith(f"/console/accounts/{account_id}?notice=")
    assert (await check(api, BUYER))["plan_name"] == "pro"

    code = {"code": "HALF", "percent_off": "50", "max_redemptions": "3", "once_per_account": "yes"}
    await confirmed(console, "create_promotion_code", code)
    await confirmed(console, "deactivate_promotion_code", {"code": "HALF"})
    codes = (await api.get("/v1/billing/promotion_codes")).json()["promotion_codes"]
    assert [(c["code"], c["once_per_account"], c["active"]) for c in codes] == [
        ("HALF", True, False)
    ]
    bad = await console.confirmation("create_promotion_code", {"code": "X"})
    assert "exactly one" in bad.text

    listed = await api.http.get("/console/catalog")
    assert "pro-eur" in listed.text
    assert "HALF" in listed.text
    assert "archived" in listed.text
    for action in ("pack_create", "pack_update", "plan_create", "account_plan",
                   "promotion_code_create", "promotion_code_update"):  # fmt: skip
        assert [row.door for row in await audit_rows(api, action)] == ["console"], action
    assert (await api.audit()).clean
