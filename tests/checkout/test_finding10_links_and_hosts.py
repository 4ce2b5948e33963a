"""Finding 10 of issue 12, "Links and hosts".

The attack: without PUBLIC_BASE_URL, the 402's `checkout_url` and the buy link's redirect were
built from the request's Host header, so `Host: evil.example` sent the buyer (and the
purchase's client secret, in the redirect) to evil.example. Now the links come from
PUBLIC_BASE_URL, or from the Host only when it is in ALLOWED_HOSTS (default: localhost,
127.0.0.1, [::1]); any other Host gets links on `http://localhost:<the server's port>`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import httpx

from ciris_billing import auth
from ciris_billing.app import create_app
from tests.support.api import Api, identity, make_settings

USER = identity("links@example.com")


@asynccontextmanager
async def service(database_url: str, **settings: Any) -> AsyncIterator[Api]:
    """The app with the given settings (nothing else changed), keys of each scope, and a
    client on http://127.0.0.1:8000 (a loopback name, as a local client would send)."""
    config = make_settings(database_url, **settings)
    app = create_app(config)
    async with app.router.lifespan_context(app):
        state = app.state.billing
        keys: dict[str, str] = {}
        async with state.engine.begin() as conn:
            for scope in auth.SCOPES:
                _key_id, keys[scope] = await auth.create_key(conn, f"t-{scope}", frozenset({scope}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as http:
            yield Api(http=http, engine=state.engine, keys=keys, settings=config, state=state)


async def refused_charge(api: Api, host: str | None = None, user: dict[str, str] = USER) -> str:
    headers = api.headers("write")
    if host is not None:
        headers["Host"] = host
    for _ in range(3):
        assert (
            await api.http.post("/v1/billing/charges", json=user, headers=headers)
        ).status_code == 201
    refused = await api.http.post("/v1/billing/charges", json=user, headers=headers)
    assert refused.status_code == 402, refused.text
    link: str = refused.json()["checkout_url"]
    return link


async def open_link(api: Api, link: str, host: str) -> str:
    opened = await api.http.get(urlsplit(link).path, headers={"Host": host})
    assert opened.status_code == 303, opened.text
    location: str = opened.headers["location"]
    return location


async def test_finding10_a_forged_host_never_makes_a_link(database_url: str) -> None:
    async with service(database_url) as api:
        link = await refused_charge(api, host="evil.example")
        assert urlsplit(link).hostname == "localhost", link
        location = await open_link(api, link, host="evil.example")
        assert urlsplit(location).hostname == "localhost", location
        assert "evil.example" not in location
        assert "#cs=" in location  # the client secret stays on our own origin
        # The purchase response's checkout_url too.
        bought = await api.http.post(
            "/v1/billing/purchases",
            json={**identity("links-buyer@example.com")},
            headers={**api.headers("write"), "Host": "evil.example:8000"},
        )
        assert bought.status_code == 201, bought.text
        assert urlsplit(bought.json()["checkout_url"]).hostname == "localhost"
        assert (await api.audit()).clean


async def test_finding10_allowed_hosts_and_public_base_url(database_url: str) -> None:
    async with service(database_url) as api:  # the default list: loopback names
        link = await refused_charge(api, host="127.0.0.1:8000")
        assert link.startswith("http://127.0.0.1:8000/v1/billing/buy/")
        location = await open_link(api, link, host="[::1]:8000")
        assert location.startswith("http://[::1]:8000/v1/billing/checkout/")
    async with service(database_url, allowed_hosts="billing.example.com") as api:
        link = await refused_charge(api, host="billing.example.com", user=identity("l2@x.com"))
        assert link.startswith("http://billing.example.com/v1/billing/buy/")
        link = (
            await api.http.post(
                "/v1/billing/charges",
                json=identity("l2@x.com"),
                headers={**api.headers(), "Host": "localhost"},
            )
        ).json()["checkout_url"]
        assert urlsplit(link).hostname == "localhost"  # not listed: the safe base
    async with service(database_url, public_base_url="https://pay.example.com/billing") as api:
        link = await refused_charge(api, host="evil.example", user=identity("l3@x.com"))
        assert link.startswith("https://pay.example.com/billing/v1/billing/buy/")
        # The proxy in front strips the /billing prefix; we see the path without it.
        served = link.replace("https://pay.example.com/billing", "http://127.0.0.1:8000")
        location = await open_link(api, served, host="evil.example")
        assert location.startswith("https://pay.example.com/billing/v1/billing/checkout/")
        assert (await api.audit()).clean
