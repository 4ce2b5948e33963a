"""The console twin of the rates API: the list, and setting a rate (confirmed, audited)."""

from __future__ import annotations

from tests.support.api import Api, identity
from tests.support.console import Console, trail


async def test_set_a_rate_in_the_console(api: Api) -> None:
    console = Console(api.http)
    assert (await console.sign_in(api.keys["admin"])).status_code == 303
    fields = {"feature": "gpt-4o-tokens", "units_per_use": "1000", "rounding": "carry"}
    asked = await console.confirmation("set_rate", fields)
    assert asked.status_code == 200
    assert "One use per 1000 units, rounding carry" in asked.text
    done = await console.confirm("set_rate", asked.text)
    assert done.status_code == 303
    listed = await api.http.get("/console/rates")
    assert '<td data-label="Feature">gpt-4o-tokens</td>' in listed.text
    bad = await console.confirmation("set_rate", {**fields, "units_per_use": "0"})
    assert "units per use" in bad.text
    [entry] = [e for e in await trail(api.engine) if e.action == "set_rate"]
    assert (entry.door, entry.subject, entry.after["units_per_use"]) == (
        "console",
        "gpt-4o-tokens",
        1000,
    )
    # Charges use it at once (the console's process forgot its copy of the rates).
    user = identity("console-rated@example.com")
    await api.post("/v1/billing/accounts", {**user, "initial_balance_minor": 2}, scope="admin")
    for expected in (0, 0, 0, 1):
        answer = await api.post(
            "/v1/billing/charges", {**user, "feature": "gpt-4o-tokens", "quantity": 300}
        )
        assert answer.json()["uses"] == expected
    assert (await api.audit()).clean
