"""Finding 8 (issue 12): a write-scope key created an account with up to 1,000,000 paid uses
through `initial_balance_minor`. Paid uses above zero are a grant: they need the admin scope."""

from __future__ import annotations

from tests.support.api import Api, identity


async def test_finding_8_initial_balance_above_zero_needs_admin(api: Api) -> None:
    user = identity("free-money@example.com")
    refused = await api.post("/v1/billing/accounts", {**user, "initial_balance_minor": 1_000_000})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "insufficient_scope"
    assert "initial_balance_minor" in refused.json()["detail"]
    missing = await api.get("/v1/billing/accounts/oauth:google/free-money@example.com")
    assert missing.status_code == 404, "nothing was created"

    # Zero (the guide's own request) and no balance at all stay open to a write key.
    zero = await api.post("/v1/billing/accounts", {**user, "initial_balance_minor": 0})
    assert zero.status_code == 201, zero.text
    assert zero.json()["credits_remaining"] == 0
    other = await api.post("/v1/billing/accounts", identity("plain@example.com"))
    assert other.status_code == 201, other.text

    # An existing account asked for again with a balance: still a grant attempt, still 403.
    again = await api.post("/v1/billing/accounts", {**user, "initial_balance_minor": 5})
    assert again.status_code == 403, again.text

    granted = await api.post(
        "/v1/billing/accounts",
        {**identity("granted@example.com"), "initial_balance_minor": 7},
        scope="admin",
    )
    assert granted.status_code == 201, granted.text
    assert granted.json()["credits_remaining"] == 7
    assert (await api.audit()).clean
