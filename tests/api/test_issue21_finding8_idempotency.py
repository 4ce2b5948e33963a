"""Issue 21 finding 8: every mutating route keeps the README's idempotency promise.

The routes are enumerated from the app itself (every POST, PUT, DELETE or PATCH an API key may
send), so a new route cannot be forgotten: each declares the `Idempotency-Key` header, and for
each a case below sends one request twice under one key (the second replays the first answer,
`Idempotent-Replayed: true`) and then a different request under the same key (409
`idempotency_key_reused`). A stored answer never shows a `whsec_` secret again, even after its
endpoint is gone.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from ciris_billing.app import create_app
from ciris_billing.events.delivery import Deliveries
from tests.api.test_security import api_routes, required_scope
from tests.support.api import UNUSED_DATABASE_URL, Api, identity, make_settings, running_app
from tests.support.flows import paid_purchase

MUTATING = {"POST", "PUT", "DELETE", "PATCH"}
# Not a change made on request: a credit check reads (it may create the account it reads, once
# per identity whatever the key, so a retry is harmless without one).
READS = {("POST", "/v1/billing/credits/check")}
HOOKS = "/v1/billing/webhook_endpoints"


def _walk(dependant: Any) -> list[str]:
    found = [param.alias for param in dependant.header_params]
    for sub in dependant.dependencies:
        found += _walk(sub)
    return found


def keyed_routes() -> dict[tuple[str, str], bool]:
    """Every mutating route an API key may call -> whether it takes an Idempotency-Key."""
    app = create_app(make_settings(UNUSED_DATABASE_URL))
    return {
        (method, route.path): "Idempotency-Key" in _walk(route.dependant)
        for route in api_routes(app.routes)
        if required_scope(route) is not None
        for method in sorted((route.methods or set()) & MUTATING)
        if (method, route.path) not in READS
    }


ROUTES = keyed_routes()


@dataclass
class Two:
    """One request (A) and a different one (B) for the same route: (path, body, scope)."""

    path_a: str
    body_a: Any
    path_b: str
    body_b: Any
    scope: str = "admin"


def who() -> dict[str, str]:
    return identity(f"idem-{uuid.uuid4().hex[:10]}@example.com")


def acct(user: dict[str, str]) -> str:
    return f"/v1/billing/accounts/{user['oauth_provider']}/{user['external_id']}"


async def account(api: Api) -> dict[str, str]:
    user = who()
    assert (await api.post("/v1/billing/accounts", user)).status_code in (200, 201)
    return user


async def hold(api: Api) -> str:
    user = await account(api)
    held = await api.post("/v1/billing/reservations", {**user, "uses": 1})
    assert held.status_code == 201, held.text
    return str(held.json()["reservation_id"])


async def endpoint(api: Api) -> str:
    made = await api.post(HOOKS, {"url": "http://127.0.0.1:9/hooks"}, scope="admin")
    assert made.status_code == 201, made.text
    return str(made.json()["id"])


async def paid(api: Api) -> str:
    return str((await paid_purchase(api, who()))["payment_id"])


async def _accounts(api: Api) -> Two:
    return Two("/v1/billing/accounts", who(), "/v1/billing/accounts", who(), "write")


async def _charges(api: Api) -> Two:
    user = await account(api)
    return Two("/v1/billing/charges", user, "/v1/billing/charges", {**user, "uses": 2}, "write")


async def _reserve(api: Api) -> Two:
    user = await account(api)
    path = "/v1/billing/reservations"
    return Two(path, {**user, "uses": 1}, path, {**user, "uses": 2}, "write")


async def _capture(api: Api) -> Two:
    path = f"/v1/billing/reservations/{await hold(api)}/capture"
    return Two(path, {}, path, {"uses": 1}, "write")


async def _release(api: Api) -> Two:
    first, second = await hold(api), await hold(api)
    return Two(
        f"/v1/billing/reservations/{first}/release",
        {},
        f"/v1/billing/reservations/{second}/release",
        {},
        "write",
    )


async def _set_rate(api: Api) -> Two:
    path, rate = "/v1/billing/rates", {"feature": "tokens", "rounding": "carry"}
    return Two(path, {**rate, "units_per_use": 10}, path, {**rate, "units_per_use": 20})


async def _grant(api: Api) -> Two:
    user = await account(api)
    return Two(
        "/v1/billing/credits",
        {**user, "uses": 5, "reason": "a"},
        "/v1/billing/credits",
        {**user, "uses": 6, "reason": "a"},
    )


async def _void_lot(api: Api) -> Two:
    paths = []
    for _ in range(2):
        user = await account(api)
        granted = await api.post(
            "/v1/billing/credits", {**user, "uses": 3, "reason": "a"}, scope="admin"
        )
        paths.append(f"/v1/billing/lots/{granted.json()['lot_id']}/void")
    return Two(paths[0], {"reason": "a"}, paths[1], {"reason": "a"})


async def _suspend(api: Api) -> Two:
    path = f"{acct(await account(api))}/suspend"
    return Two(path, {"reason": "a"}, path, {"reason": "b"})


async def _reactivate(api: Api) -> Two:
    return Two(
        f"{acct(await account(api))}/reactivate", {}, f"{acct(await account(api))}/reactivate", {}
    )


async def _threshold(api: Api) -> Two:
    path = f"{acct(await account(api))}/low_balance_threshold"
    return Two(path, {"uses": 2}, path, {"uses": 4})


async def _erase(api: Api) -> Two:
    return Two(acct(await account(api)), None, acct(await account(api)), None)


async def _auto_topup_put(api: Api) -> Two:
    path = f"{acct(await account(api))}/auto_topup"
    return Two(path, {"enabled": False}, path, {"enabled": True}, "write")


async def _auto_topup_delete(api: Api) -> Two:
    return Two(
        f"{acct(await account(api))}/auto_topup",
        None,
        f"{acct(await account(api))}/auto_topup",
        None,
        "write",
    )


async def _portal_link(api: Api) -> Two:
    a, b = acct(await account(api)), acct(await account(api))
    return Two(f"{a}/portal_link", None, f"{b}/portal_link", None, "write")


async def _portal_links_revoke(api: Api) -> Two:
    a, b = acct(await account(api)), acct(await account(api))
    return Two(f"{a}/portal_links/revoke", None, f"{b}/portal_links/revoke", None, "write")


async def _purchase(api: Api) -> Two:
    path = "/v1/billing/purchases"
    return Two(path, who(), path, who(), "write")


async def _refund(api: Api) -> Two:
    path = f"/v1/billing/purchases/{await paid(api)}/refund"
    return Two(path, {"amount_minor": 100}, path, {"amount_minor": 200})


async def _sync(api: Api) -> Two:
    first, second = await paid(api), await paid(api)
    return Two(
        f"/v1/billing/purchases/{first}/sync",
        {},
        f"/v1/billing/purchases/{second}/sync",
        {},
        "write",
    )


async def _dispute(api: Api) -> Two:
    path = f"/v1/billing/sandbox/payment_intents/{await paid(api)}/dispute"
    return Two(path, {"status": "needs_response"}, path, {"status": "won"})


async def _dashboard_refund(api: Api) -> Two:
    path = f"/v1/billing/sandbox/payment_intents/{await paid(api)}/dashboard_refund"
    return Two(path, {"amount_minor": 100}, path, {"amount_minor": 200})


async def _test_clock(api: Api) -> Two:
    path = "/v1/billing/test_clock/advance"
    return Two(path, {"seconds": 60}, path, {"seconds": 120})


async def _endpoint_create(api: Api) -> Two:
    return Two(HOOKS, {"url": "http://127.0.0.1:9/a"}, HOOKS, {"url": "http://127.0.0.1:9/b"})


def _on_endpoint(suffix: str) -> Callable[[Api], Awaitable[Two]]:
    async def two(api: Api) -> Two:
        first, second = await endpoint(api), await endpoint(api)
        return Two(f"{HOOKS}/{first}{suffix}", {}, f"{HOOKS}/{second}{suffix}", {})

    return two


async def _endpoint_delete(api: Api) -> Two:
    first, second = await endpoint(api), await endpoint(api)
    return Two(f"{HOOKS}/{first}", None, f"{HOOKS}/{second}", None)


async def _resend(api: Api) -> Two:
    first, second = await endpoint(api), await endpoint(api)
    await account(api)  # an event for both endpoints: account.created
    await Deliveries(api.engine, api.settings).run_once()  # port 9: refused, kept to retry
    paths = []
    for we in (first, second):
        listed = (await api.get(f"{HOOKS}/{we}/deliveries", scope="admin")).json()["data"]
        assert listed, listed
        paths.append(f"{HOOKS}/{we}/deliveries/{listed[0]['id']}/resend")
    return Two(paths[0], {}, paths[1], {})


def _uid() -> str:
    return uuid.uuid4().hex[:10]


def _pack(pack_id: str) -> dict[str, Any]:
    return {"pack_id": pack_id, "name": "n", "uses": 5, "price_minor": 100, "currency": "USD"}


async def _pack_create(api: Api) -> Two:
    path = "/v1/billing/packs"
    return Two(path, _pack(f"p{_uid()}"), path, _pack(f"p{_uid()}"))


async def _pack_update(api: Api) -> Two:
    first, second = f"p{_uid()}", f"p{_uid()}"
    for pack_id in (first, second):
        assert (await api.post("/v1/billing/packs", _pack(pack_id), "admin")).status_code == 201
    body = {"active": False}
    return Two(f"/v1/billing/packs/{first}", body, f"/v1/billing/packs/{second}", body)


async def _plan_create(api: Api) -> Two:
    path = "/v1/billing/plans"
    return Two(
        path, {"name": f"p{_uid()}", "free_uses": 1}, path, {"name": f"p{_uid()}", "free_uses": 1}
    )


async def _plan_update(api: Api) -> Two:
    first, second = f"p{_uid()}", f"p{_uid()}"
    for name in (first, second):
        made = await api.post("/v1/billing/plans", {"name": name, "free_uses": 1}, "admin")
        assert made.status_code == 201
    body = {"free_uses": 2}
    return Two(f"/v1/billing/plans/{first}", body, f"/v1/billing/plans/{second}", body)


async def _account_plan(api: Api) -> Two:
    first, second = await account(api), await account(api)
    body = {"plan_name": "paid"}
    return Two(acct(first), body, acct(second), body)


async def _code_create(api: Api) -> Two:
    path = "/v1/billing/promotion_codes"
    return Two(
        path,
        {"code": f"C{_uid()}", "percent_off": 5},
        path,
        {"code": f"C{_uid()}", "percent_off": 5},
    )


async def _code_update(api: Api) -> Two:
    first, second = f"C{_uid()}", f"C{_uid()}"
    for code in (first, second):
        made = await api.post(
            "/v1/billing/promotion_codes", {"code": code, "percent_off": 5}, "admin"
        )
        assert made.status_code == 201
    body = {"active": False}
    path = "/v1/billing/promotion_codes/"
    return Two(path + first, body, path + second, body)


CASES: dict[tuple[str, str], Callable[[Api], Awaitable[Two]]] = {
    ("POST", "/v1/billing/packs"): _pack_create,
    ("PATCH", "/v1/billing/packs/{pack_id}"): _pack_update,
    ("POST", "/v1/billing/plans"): _plan_create,
    ("PATCH", "/v1/billing/plans/{name}"): _plan_update,
    ("PATCH", "/v1/billing/accounts/{oauth_provider}/{external_id}"): _account_plan,
    ("POST", "/v1/billing/promotion_codes"): _code_create,
    ("PATCH", "/v1/billing/promotion_codes/{code}"): _code_update,
    ("POST", "/v1/billing/accounts"): _accounts,
    ("POST", "/v1/billing/charges"): _charges,
    ("POST", "/v1/billing/reservations"): _reserve,
    ("POST", "/v1/billing/reservations/{reservation_id}/capture"): _capture,
    ("POST", "/v1/billing/reservations/{reservation_id}/release"): _release,
    ("POST", "/v1/billing/credits"): _grant,
    ("POST", "/v1/billing/rates"): _set_rate,
    ("POST", "/v1/billing/lots/{lot_id}/void"): _void_lot,
    ("POST", "/v1/billing/accounts/{oauth_provider}/{external_id}/suspend"): _suspend,
    ("POST", "/v1/billing/accounts/{oauth_provider}/{external_id}/reactivate"): _reactivate,
    ("PUT", "/v1/billing/accounts/{oauth_provider}/{external_id}/low_balance_threshold"): (
        _threshold
    ),
    ("DELETE", "/v1/billing/accounts/{oauth_provider}/{external_id}"): _erase,
    ("PUT", "/v1/billing/accounts/{oauth_provider}/{external_id}/auto_topup"): _auto_topup_put,
    ("DELETE", "/v1/billing/accounts/{oauth_provider}/{external_id}/auto_topup"): (
        _auto_topup_delete
    ),
    ("POST", "/v1/billing/accounts/{oauth_provider}/{external_id}/portal_link"): _portal_link,
    ("POST", "/v1/billing/accounts/{oauth_provider}/{external_id}/portal_links/revoke"): (
        _portal_links_revoke
    ),
    ("POST", "/v1/billing/purchases"): _purchase,
    ("POST", "/v1/billing/purchases/{payment_id}/refund"): _refund,
    ("POST", "/v1/billing/purchases/{payment_id}/sync"): _sync,
    ("POST", "/v1/billing/sandbox/payment_intents/{payment_id}/dispute"): _dispute,
    ("POST", "/v1/billing/sandbox/payment_intents/{payment_id}/dashboard_refund"): (
        _dashboard_refund
    ),
    ("POST", "/v1/billing/test_clock/advance"): _test_clock,
    ("POST", HOOKS): _endpoint_create,
    ("DELETE", HOOKS + "/{endpoint_id}"): _endpoint_delete,
    ("POST", HOOKS + "/{endpoint_id}/rotate_secret"): _on_endpoint("/rotate_secret"),
    ("POST", HOOKS + "/{endpoint_id}/disable"): _on_endpoint("/disable"),
    ("POST", HOOKS + "/{endpoint_id}/enable"): _on_endpoint("/enable"),
    ("POST", HOOKS + "/{endpoint_id}/deliveries/{delivery_id}/resend"): _resend,
}


@pytest.fixture
async def hooks_api(database_url: str) -> AsyncIterator[Api]:
    settings = make_settings(
        database_url,
        rate_limit_account_per_minute=60_000,
        allow_private_webhook_urls=True,
        webhook_timeout_seconds=2.0,
    )
    async with running_app(settings) as api:
        yield api


def test_finding8_every_mutating_route_takes_an_idempotency_key() -> None:
    assert {route for route, keyed in ROUTES.items() if not keyed} == set()


def test_finding8_every_mutating_route_has_a_case() -> None:
    """A new mutating route fails here until it gets its case below."""
    assert set(ROUTES) == set(CASES)


async def send(api: Api, method: str, path: str, body: Any, scope: str, key: str) -> Any:
    headers = api.headers(scope, **{"Idempotency-Key": key})
    if body is None:
        return await api.http.request(method, path, headers=headers)
    return await api.http.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(
    ("method", "path"), sorted(CASES), ids=[f"{m} {p}" for m, p in sorted(CASES)]
)
async def test_finding8_same_key_replays_and_another_request_is_409(
    hooks_api: Api, method: str, path: str
) -> None:
    two = await CASES[(method, path)](hooks_api)
    key = f"k-{uuid.uuid4().hex}"

    first = await send(hooks_api, method, two.path_a, two.body_a, two.scope, key)
    again = await send(hooks_api, method, two.path_a, two.body_a, two.scope, key)
    other = await send(hooks_api, method, two.path_b, two.body_b, two.scope, key)

    assert 200 <= first.status_code < 300, first.text
    assert again.status_code == first.status_code, again.text
    assert again.headers.get("Idempotent-Replayed") == "true"
    if "secret" not in first.json():
        assert again.json() == first.json()
    assert other.status_code == 409, other.text
    assert other.json()["error"] == "idempotency_key_reused"
    assert (await hooks_api.audit()).clean


async def test_finding8_a_replayed_creation_never_shows_the_secret_again(hooks_api: Api) -> None:
    key = f"k-{uuid.uuid4().hex}"
    body = {"url": "http://127.0.0.1:9/secret"}
    made = await hooks_api.post(HOOKS, body, scope="admin", **{"Idempotency-Key": key})
    assert made.json()["secret"].startswith("whsec_")
    replayed = await hooks_api.post(HOOKS, body, scope="admin", **{"Idempotency-Key": key})
    assert replayed.headers.get("Idempotent-Replayed") == "true"
    assert "secret" not in replayed.json()
    assert "whsec_" not in replayed.text
    assert replayed.json()["id"] == made.json()["id"]

    deleted = await hooks_api.http.delete(
        f"{HOOKS}/{made.json()['id']}", headers=hooks_api.headers("admin")
    )
    assert deleted.status_code == 200
    after = await hooks_api.post(HOOKS, body, scope="admin", **{"Idempotency-Key": key})
    assert "whsec_" not in after.text
    rotate_key = f"k-{uuid.uuid4().hex}"
    we = await endpoint(hooks_api)
    rotated = await hooks_api.post(
        f"{HOOKS}/{we}/rotate_secret", {}, scope="admin", **{"Idempotency-Key": rotate_key}
    )
    assert rotated.json()["secret"].startswith("whsec_")
    again = await hooks_api.post(
        f"{HOOKS}/{we}/rotate_secret", {}, scope="admin", **{"Idempotency-Key": rotate_key}
    )
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert "whsec_" not in again.text
