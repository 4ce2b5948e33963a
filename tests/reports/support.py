"""Helpers of the reports' tests: an installation selling 3 uses for 1000 (a cost basis that
does not divide), purchases, charges, refunds, voids and the expiry job through the API."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from ciris_billing import clock
from ciris_billing.job_recovery import Recovery
from tests.support.api import Api, identity, make_settings, running_app
from tests.support.flows import VISA, pay, purchase

PRICE, USES = 1000, 3
REVENUE = "/v1/billing/reports/revenue"
USAGE = "/v1/billing/reports/usage"


@pytest.fixture
async def shop(database_url: str) -> AsyncIterator[Api]:
    settings = make_settings(
        database_url,
        price_per_purchase_minor=PRICE,
        paid_uses_per_purchase=USES,
        free_uses_per_account=1,
        rate_limit_account_per_minute=60_000,
        allowed_hosts=["billing.test"],
    )
    async with running_app(settings) as api:
        try:
            yield api
        finally:
            clock.set_offset(0)


def who(name: str) -> dict[str, str]:
    return identity(f"reports-{name}@example.com")


async def buy(api: Api, user: dict[str, str]) -> dict[str, Any]:
    bought = await purchase(api, user)
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    return bought


async def charge(api: Api, user: dict[str, str], uses: int) -> None:
    answer = await api.post("/v1/billing/charges", {**user, "uses": uses})
    assert answer.status_code == 201, answer.text


async def refund(api: Api, bought: dict[str, Any], amount_minor: int | None = None) -> None:
    body = {} if amount_minor is None else {"amount_minor": amount_minor}
    path = f"/v1/billing/purchases/{bought['payment_id']}/refund"
    answer = await api.post(path, body, scope="admin")
    assert answer.status_code == 201, answer.text


async def paid_grant(api: Api, user: dict[str, str], uses: int, cost: int, days: int) -> str:
    body = {**user, "uses": uses, "reason": "sold offline", "kind": "paid"}
    body |= {"cost_basis_minor": cost, "expires_in_days": days}
    answer = await api.post("/v1/billing/credits", body, "admin")
    assert answer.status_code == 201, answer.text
    return str(answer.json()["lot_id"])


async def paid_lot(api: Api, user: dict[str, str]) -> str:
    path = f"/v1/billing/accounts/{user['oauth_provider']}/{user['external_id']}/lots"
    answer = await api.get(path, include="all")
    return str(next(lot["lot_id"] for lot in answer.json()["lots"] if lot["kind"] == "paid"))


async def void(api: Api, lot_id: str) -> None:
    answer = await api.post(f"/v1/billing/lots/{lot_id}/void", {"reason": "chargeback"}, "admin")
    assert answer.status_code == 200, answer.text


async def advance(api: Api, days: int) -> datetime:
    moved = await api.post("/v1/billing/test_clock/advance", {"seconds": days * 86_400}, "admin")
    assert moved.status_code == 200, moved.text
    return clock.now()


async def run_jobs(api: Api) -> None:
    await Recovery(api.settings, api.engine, api.state.provider).run_once()


async def report(api: Api, path: str, **params: Any) -> list[dict[str, Any]]:
    answer = await api.get(path, "admin", **params)
    assert answer.status_code == 200, answer.text
    rows: list[dict[str, Any]] = answer.json()["rows"]
    return rows


async def report_csv(api: Api, path: str, **params: Any) -> list[dict[str, str]]:
    answer = await api.http.get(
        path, params=params, headers=api.headers("admin", Accept="text/csv")
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(answer.text)))


def identity_holds(row: dict[str, Any]) -> bool:
    return int(row["deferred_end_minor"]) == (
        int(row["deferred_start_minor"])
        + int(row["purchases_minor"])
        - int(row["refunds_minor"])
        - int(row["recognized_minor"])
        - int(row["breakage_minor"])
    )
