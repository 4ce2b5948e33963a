"""Issue 21, finding 15: `balance.low`'s default threshold equalled the free uses, so every new
user's first use fired it; and `plan_name` stayed `free` after a purchase.

Decided (README "Rules worth knowing" and "Events"): `plan_name` is `free` until the account
first gets paid uses (a purchase credited, a grant, an initial balance), then `paid` (an app's
own plan name, given at creation, stays); the default threshold (LOW_BALANCE_THRESHOLD_USES)
applies only to accounts not on `free`, so no `balance.low` on free uses alone. An account's
own threshold (PUT .../low_balance_threshold) applies whatever its plan.
"""

from __future__ import annotations

from tests.support.api import Api, identity
from tests.support.events import events_of, types
from tests.support.flows import paid_purchase

CHARGES = "/v1/billing/charges"
NEWCOMER = identity("newcomer@example.com")


async def test_finding15_no_balance_low_for_a_new_user_on_free_uses(api: Api) -> None:
    answers = [await api.post(CHARGES, NEWCOMER) for _ in range(3)]  # the 3 free uses

    assert [a.status_code for a in answers] == [201, 201, 201]
    assert [a.json()["plan_name"] for a in answers] == ["free"] * 3
    assert "balance.low" not in types(await events_of(api.engine, NEWCOMER["external_id"]))
    assert (await api.audit()).clean


async def test_finding15_after_a_purchase_plan_is_paid_and_balance_low_fires(api: Api) -> None:
    for _ in range(3):
        assert (await api.post(CHARGES, NEWCOMER)).status_code == 201
    await paid_purchase(api, NEWCOMER)  # 20 uses

    account = await api.get(f"/v1/billing/accounts/oauth:google/{NEWCOMER['external_id']}")
    assert account.json()["plan_name"] == "paid"
    answers = [await api.post(CHARGES, NEWCOMER) for _ in range(18)]  # 20 -> 2: crosses 3

    assert {a.status_code for a in answers} == {201}
    assert answers[-1].json()["plan_name"] == "paid"
    low = [
        e
        for e in await events_of(api.engine, NEWCOMER["external_id"])
        if e["type"] == "balance.low"
    ]
    assert len(low) == 1
    assert low[0]["data"]["available_uses"] == 2
    assert (await api.audit()).clean


async def test_finding15_an_apps_own_plan_name_stays_after_a_purchase(api: Api) -> None:
    made = await api.post("/v1/billing/accounts", {**NEWCOMER, "plan_name": "team"}, scope="admin")
    assert made.status_code == 201, made.text

    await paid_purchase(api, NEWCOMER)

    account = await api.get(f"/v1/billing/accounts/oauth:google/{NEWCOMER['external_id']}")
    assert account.json()["plan_name"] == "team"


async def test_finding15_an_accounts_own_threshold_fires_on_free_uses(api: Api) -> None:
    path = f"/v1/billing/accounts/oauth:google/{NEWCOMER['external_id']}/low_balance_threshold"
    assert (await api.post(CHARGES, NEWCOMER)).status_code == 201  # the account exists: 2 left
    own = await api.http.put(path, json={"uses": 2}, headers=api.headers("admin"))
    assert own.status_code == 200, own.text

    assert (await api.post(CHARGES, NEWCOMER)).status_code == 201  # 2 -> 1: crosses 2

    assert "balance.low" in types(await events_of(api.engine, NEWCOMER["external_id"]))
    assert (await api.audit()).clean


async def test_finding15_granted_paid_uses_make_the_plan_paid(api: Api) -> None:
    assert (await api.post(CHARGES, NEWCOMER)).status_code == 201
    granted = await api.post(
        "/v1/billing/credits", {**NEWCOMER, "uses": 5, "reason": "welcome"}, scope="admin"
    )
    assert granted.status_code == 201, granted.text
    opened = await api.post(
        "/v1/billing/accounts",
        {**identity("gifted@example.com"), "initial_balance_minor": 5},
        scope="admin",
    )

    account = await api.get(f"/v1/billing/accounts/oauth:google/{NEWCOMER['external_id']}")
    assert account.json()["plan_name"] == "paid"
    assert opened.json()["plan_name"] == "paid"
    assert (await api.audit()).clean
