"""The webhook endpoint API (admin scope): create (secret shown once), list, get, delete,
rotate, disable/enable, deliveries, resend; and the SSRF guard's refusals."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.api import Api

BASE = "/v1/billing/webhook_endpoints"


async def create(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post(BASE, body, scope="admin")
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_create_shows_the_secret_once_then_never(hooks_api: Api) -> None:
    created = await create(
        hooks_api,
        {
            "url": "http://127.0.0.1:9/hooks",
            "events": ["purchase.succeeded", "balance.low"],
            "description": "app",
        },
    )
    assert created["id"].startswith("we_")
    assert created["secret"].startswith("whsec_")
    assert created["status"] == "enabled"
    assert created["events"] == ["balance.low", "purchase.succeeded"]  # our order
    one = (await hooks_api.get(f"{BASE}/{created['id']}", scope="admin")).json()
    assert "secret" not in one
    assert one["url"] == "http://127.0.0.1:9/hooks"
    listed = (await hooks_api.get(BASE, scope="admin")).json()["data"]
    assert [e["id"] for e in listed] == [created["id"]]
    assert "secret" not in listed[0]


async def test_every_event_when_no_filter_and_unknown_types_refused(hooks_api: Api) -> None:
    created = await create(hooks_api, {"url": "http://127.0.0.1:9/all"})
    assert created["events"] is None
    refused = await hooks_api.post(
        BASE, {"url": "http://127.0.0.1:9/x", "events": ["balance.lo"]}, scope="admin"
    )
    assert refused.status_code == 422
    assert "balance.lo" in refused.json()["detail"]
    empty = await hooks_api.post(BASE, {"url": "http://127.0.0.1:9/x", "events": []}, scope="admin")
    assert empty.status_code == 422


async def test_admin_scope_only(hooks_api: Api) -> None:
    for scope in ("read", "write"):
        response = await hooks_api.post(BASE, {"url": "http://127.0.0.1:9/x"}, scope=scope)
        assert response.status_code == 403
        assert (await hooks_api.get(BASE, scope=scope)).status_code == 403


async def test_rotate_disable_enable_delete(hooks_api: Api) -> None:
    created = await create(hooks_api, {"url": "http://127.0.0.1:9/hooks"})
    path = f"{BASE}/{created['id']}"
    rotated = await hooks_api.post(f"{path}/rotate_secret", {}, scope="admin")
    assert rotated.status_code == 200
    assert rotated.json()["secret"].startswith("whsec_")
    assert rotated.json()["secret"] != created["secret"]
    assert rotated.json()["previous_secret_expires_at"] is not None
    disabled = await hooks_api.post(f"{path}/disable", {}, scope="admin")
    assert disabled.json()["status"] == "disabled"
    enabled = await hooks_api.post(f"{path}/enable", {}, scope="admin")
    assert enabled.json()["status"] == "enabled"
    deleted = await hooks_api.http.delete(path, headers=hooks_api.headers("admin"))
    assert deleted.json() == {"id": created["id"], "deleted": True}
    assert (await hooks_api.get(path, scope="admin")).status_code == 404
    assert (await hooks_api.post(f"{path}/disable", {}, scope="admin")).status_code == 404
    missing = await hooks_api.post(f"{path}/deliveries/whd_nope/resend", {}, scope="admin")
    assert missing.status_code == 404


async def test_create_with_an_idempotency_key_replays_the_same_endpoint(hooks_api: Api) -> None:
    body = {"url": "http://127.0.0.1:9/hooks"}
    first = await hooks_api.post(BASE, body, scope="admin", **{"Idempotency-Key": "we-1"})
    again = await hooks_api.post(BASE, body, scope="admin", **{"Idempotency-Key": "we-1"})
    # The same endpoint; its secret is shown once only: never kept for a replay (issue 21
    # finding 8).
    assert {k: v for k, v in first.json().items() if k != "secret"} == again.json()
    assert len((await hooks_api.get(BASE, scope="admin")).json()["data"]) == 1


# The SSRF guard, with its default (ALLOW_PRIVATE_WEBHOOK_URLS unset): `api` is such an app.
@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/hooks",  # loopback
        "https://localhost/hooks",  # a name resolving to loopback
        "https://[::1]/hooks",
        "https://10.1.2.3/hooks",  # private
        "https://192.168.0.10/hooks",
        "https://172.16.5.4/hooks",
        "https://169.254.169.254/latest/meta-data",  # link-local: cloud metadata
        "https://[fd00:ec2::254]/",  # AWS metadata over IPv6 (unique local)
        "https://100.100.100.200/",  # shared address space (Alibaba metadata)
        "https://[::ffff:127.0.0.1]/",  # IPv4 loopback written as IPv6
        "https://0.0.0.0/",
        "http://93.184.215.14/hooks",  # public, but http
        "ftp://93.184.215.14/",
        "https://user:pass@93.184.215.14/",  # credentials in the URL
        "https://no-such-host.invalid/hooks",  # does not resolve
    ],
)
async def test_ssrf_guard_refuses_private_and_plain_urls(api: Api, url: str) -> None:
    response = await api.post(BASE, {"url": url}, scope="admin")
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "webhook_url_refused"
    assert (await api.get(BASE, scope="admin")).json()["data"] == []


async def test_ssrf_guard_accepts_a_public_https_address(api: Api) -> None:
    # An IP literal: no DNS needed, so the test runs offline.
    created = await create(api, {"url": "https://93.184.215.14/hooks"})
    assert created["url"] == "https://93.184.215.14/hooks"
