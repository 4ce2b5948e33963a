"""Finding 6 (issue 12): refunds and disputes compose. A purchase with an open dispute cannot
be refunded (409, as Stripe); a refund that still arrives (the provider's dashboard, by webhook)
never takes a use twice: whatever the order, the uses taken back never exceed the purchase's
uses, and held uses are never taken (recorded as shortfall)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

from sqlalchemy import select

from ciris_billing.db import accounts
from tests.support.api import Api, identity
from tests.support.flows import VISA, check, pay, purchase

USER = identity("disputed@example.com")


async def paid_purchase(api: Api) -> dict[str, Any]:
    bought = await purchase(api, USER)
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    return bought


async def refund(api: Api, payment_id: str, body: dict[str, Any] | None = None) -> Any:
    return await api.post(f"/v1/billing/purchases/{payment_id}/refund", body or {}, scope="admin")


async def dashboard_refund(api: Api, payment_id: str, amount_minor: int | None = None) -> Any:
    """A refund made in the provider's dashboard: only its webhook tells the service."""
    body = {} if amount_minor is None else {"amount_minor": amount_minor}
    return await api.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/dashboard_refund", body, scope="admin"
    )


async def dispute(api: Api, payment_id: str, status: str) -> Any:
    response = await api.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/dispute",
        {"status": status},
        scope="admin",
    )
    assert response.status_code == 200, response.text
    return response


async def balances(api: Api) -> tuple[int, int]:
    """(paid uses, held uses) of the user's account."""
    async with api.engine.connect() as conn:
        row = (
            await conn.execute(
                select(accounts.c.paid_uses_remaining, accounts.c.held_uses).where(
                    accounts.c.external_id == USER["external_id"]
                )
            )
        ).one()
    return int(row.paid_uses_remaining), int(row.held_uses)


async def test_finding_6_refund_while_a_dispute_is_open_is_409(api: Api) -> None:
    first = await paid_purchase(api)
    await paid_purchase(api)  # another 20 uses, which no refund of the first may touch
    await dispute(api, first["payment_id"], "needs_response")
    assert await balances(api) == (20, 20)

    refused = await refund(api, first["payment_id"])
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "refund_not_allowed"
    assert "dispute" in refused.json()["detail"]
    assert await balances(api) == (20, 20), "nothing taken"

    await dispute(api, first["payment_id"], "won")
    assert await balances(api) == (40, 0)
    after_won = await refund(api, first["payment_id"])  # a won dispute may be refunded
    assert after_won.status_code == 201, after_won.text
    assert (after_won.json()["uses_reversed"], after_won.json()["shortfall_uses"]) == (20, 0)
    assert await balances(api) == (20, 0)
    assert (await api.audit()).clean


async def test_finding_6_refund_during_dispute_then_won_leaves_no_paid_uses(api: Api) -> None:
    """The attack: refunded (here in the dashboard, the API refuses) during an open dispute,
    then the dispute won: the 20 uses of a fully refunded purchase came back."""
    bought = await paid_purchase(api)
    await dispute(api, bought["payment_id"], "needs_response")
    assert (await dashboard_refund(api, bought["payment_id"])).status_code == 200
    assert await balances(api) == (0, 20), "held uses are never taken by the refund"
    await dispute(api, bought["payment_id"], "won")
    assert await balances(api) == (0, 0), "a fully refunded purchase keeps no uses"
    assert (await check(api, USER))["credits_remaining"] == 0
    assert (await api.audit()).clean


async def test_finding_6_dashboard_refund_during_dispute_takes_no_other_purchase(
    api: Api,
) -> None:
    first = await paid_purchase(api)
    await paid_purchase(api)
    await dispute(api, first["payment_id"], "needs_response")
    assert (await dashboard_refund(api, first["payment_id"], 250)).status_code == 200
    assert await balances(api) == (20, 20), "the other purchase's uses stay"
    await dispute(api, first["payment_id"], "lost")
    assert await balances(api) == (20, 0), "the first purchase's 20 uses went back once"
    assert (await api.audit()).clean


async def test_finding_6_lost_dispute_then_refund_takes_the_uses_once(api: Api) -> None:
    """The attack: a lost dispute, then a refund, took 20 uses twice (the second time from
    another purchase)."""
    first = await paid_purchase(api)
    await paid_purchase(api)
    await dispute(api, first["payment_id"], "needs_response")
    await dispute(api, first["payment_id"], "lost")
    assert await balances(api) == (20, 0)

    refused = await refund(api, first["payment_id"])
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "refund_not_allowed"
    # The dashboard does it anyway: its webhook takes nothing more.
    assert (await dashboard_refund(api, first["payment_id"])).status_code == 200
    assert await balances(api) == (20, 0), "the other purchase's 20 uses stay"
    assert (await api.audit()).clean


async def test_finding_6_cli_refund_while_a_dispute_is_open_is_refused(api: Api) -> None:
    bought = await paid_purchase(api)
    await dispute(api, bought["payment_id"], "under_review")
    env = {**os.environ, "DATABASE_URL": api.database_url, "PAYMENT_PROVIDER": "sandbox"}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ciris_billing.cli", "refund", bought["payment_id"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0, done.stdout
    assert "refund_not_allowed" in done.stderr
    assert await balances(api) == (0, 20)
    assert (await api.audit()).clean
