"""What the catalog's tests share: making packs, plans and codes over the API."""

from __future__ import annotations

from typing import Any

import httpx

from tests.support.api import Api

EUR_PACK = {
    "pack_id": "pro-eur",
    "name": "100 uses",
    "uses": 100,
    "price_minor": 2000,
    "currency": "EUR",
    "expires_in_days": 30,
}


async def patch(api: Api, path: str, body: Any, scope: str = "admin") -> httpx.Response:
    return await api.http.patch(path, json=body, headers=api.headers(scope))


async def made(api: Api, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post(path, body, "admin")
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def eur_account(api: Api, user: dict[str, str]) -> None:
    created = await api.post("/v1/billing/accounts", {**user, "currency": "EUR"})
    assert created.status_code in (200, 201), created.text


async def audit_rows(api: Api, action: str) -> list[Any]:
    from sqlalchemy import text

    async with api.engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT * FROM audit_trail WHERE action = :a ORDER BY created_at"), {"a": action}
        )
        return list(rows)
