"""Issue 21 finding 3: switching auto top-up on when it is already on changes nothing.

It reset the start time (`enabled_at`), so a balance.low crossing not yet acted on by the job
was older than the new start and skipped: no top-up for an account whose balance was low."""

from __future__ import annotations

from tests.autotopup.test_auto_topup import (
    buy_saving_card,
    drain_below_threshold,
    off_session_payments,
    run_job,
    settings_row,
    user,
)
from tests.support.api import Api


async def test_finding03_enabling_auto_topup_already_on_keeps_a_pending_crossing(
    api: Api,
) -> None:
    who = user()
    await buy_saving_card(api, who)  # on, with a card
    await drain_below_threshold(api, who)  # a crossing the job has not acted on yet
    before = await settings_row(api, who)

    path = f"/v1/billing/accounts/oauth:google/{who}/auto_topup"
    again = await api.http.put(path, json={"enabled": True}, headers=api.headers("write"))

    assert again.status_code == 200, again.text
    assert again.json()["enabled"] is True
    after = await settings_row(api, who)
    assert (after.enabled_at, after.updated_at) == (before.enabled_at, before.updated_at)
    report = await run_job(api)
    assert report.started == 1
    assert await off_session_payments(api) == 1
    assert (await api.audit()).clean


async def test_finding03_enabling_after_off_starts_afresh(api: Api) -> None:
    """Off then on is a new start: crossings from before it are not acted on (as before)."""
    who = user()
    await buy_saving_card(api, who)
    await drain_below_threshold(api, who)
    path = f"/v1/billing/accounts/oauth:google/{who}/auto_topup"
    off = await api.http.put(path, json={"enabled": False}, headers=api.headers("write"))
    on = await api.http.put(path, json={"enabled": True}, headers=api.headers("write"))

    assert (off.status_code, on.status_code) == (200, 200)
    assert (await settings_row(api, who)).enabled_at > (await settings_row(api, who)).created_at
    assert (await run_job(api)).started == 0
