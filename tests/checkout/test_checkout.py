"""The payment page: its link, its public summary (the client secret is the credential), the
page's headers and markup in sandbox and Stripe mode. The browser test is
test_checkout_browser.py."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing.checkout import checkout_url
from ciris_billing.checkout.routes import content_security_policy, format_price
from tests.support.api import Api, identity, make_settings
from tests.support.localstripe import TEST_API_KEY, LocalStripe, run_localstripe

USER = identity("checkout@example.com")
VISA = "4242 4242 4242 4242"
DECLINED = "4000 0000 0000 9995"
NEEDS_3DS = "4000 0025 0000 3155"
NOT_FOUND = {
    "error": "checkout_not_found",
    "detail": "No such checkout (unknown payment, or wrong client secret)",
}

# stripe 16.1.0's HTTPXClient passes its body to httpx as `data=<str>` (deprecated in 0.28).
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


async def purchase(api: Api, user: dict[str, str] = USER) -> dict[str, Any]:
    response = await api.post("/v1/billing/purchases", {**user, "customer_email": None})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def summary(api: Api, payment_id: str, secret: str | bytes | None) -> httpx.Response:
    raw = secret.encode("latin-1") if isinstance(secret, str) else secret
    headers = [] if raw is None else [(b"X-Client-Secret", raw)]
    # No API key: the page calls this with the client secret only.
    return await api.http.get(f"/v1/billing/checkout/{payment_id}/summary", headers=headers)


def page_path(bought: dict[str, Any]) -> str:
    return f"/v1/billing/checkout/{bought['payment_id']}"


# --- the link ---------------------------------------------------------------------------


def test_checkout_url_puts_the_secret_in_the_fragment() -> None:
    url = checkout_url("https://billing.example.com/", "pi_sbx_abc", "pi_sbx_abc_secret_x-Y_z")
    assert url == (
        "https://billing.example.com/v1/billing/checkout/pi_sbx_abc#cs=pi_sbx_abc_secret_x-Y_z"
    )
    assert httpx.URL(url).path == "/v1/billing/checkout/pi_sbx_abc"
    assert "secret" not in httpx.URL(url).query.decode()
    # A path prefix is kept; characters that would break the URL are escaped.
    assert (
        checkout_url("http://h/api", "pi/1", "a#b&c")
        == "http://h/api/v1/billing/checkout/pi%2F1#cs=a%23b%26c"
    )


def test_format_price() -> None:
    assert format_price(500, "USD") == "$5.00"
    assert format_price(123456, "eur") == "€1,234.56"
    assert format_price(500, "JPY") == "¥500"
    assert format_price(5000, "KWD") == "5.000 KWD"
    assert format_price(950, "CHF") == "9.50 CHF"


# --- the summary ------------------------------------------------------------------------


async def test_summary_needs_the_purchases_client_secret(api: Api) -> None:
    bought = await purchase(api)
    other = await purchase(api, identity("someone-else@example.com"))
    payment_id, secret = bought["payment_id"], bought["client_secret"]

    for wrong in (
        None,
        "",
        "nope",
        other["client_secret"],
        secret + "x",
        secret[:-1],
        "é".encode("latin-1") * 10,
    ):
        response = await summary(api, payment_id, wrong)
        assert response.status_code == 404, wrong
        assert response.json() == NOT_FOUND
    # An unknown payment answers exactly like a wrong secret: the summary is no oracle.
    for unknown in ("pi_sbx_unknown", "pi_sbx_" + "0" * 24, "x" * 300, "pi-with-dash"):
        response = await summary(api, unknown, secret)
        assert response.status_code == 404
        assert response.json() == NOT_FOUND
    assert (await summary(api, payment_id, "s" * 5000)).status_code == 404

    response = await summary(api, payment_id, secret)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"
    answer = response.json()
    # The catalog (issue 24): the account's packs, each with its buy link.
    offers = answer.pop("offers")
    assert [(o["pack_id"], o["price"]) for o in offers] == [("default", "$5.00")]
    assert "?pack_id=default" in offers[0]["buy_url"]
    assert answer == {
        "pack_id": "default",
        "payment_id": payment_id,
        "uses": 20,
        "uses_purchased": 20,
        "amount_minor": 500,
        "currency": "USD",
        "price": "$5.00",
        "status": "requires_payment_method",
        "payment_status": "requires_payment_method",
        "credited": False,
        "failure_message": None,
        "free_uses_remaining": 3,
        "credits_remaining": 0,
        "provider": "sandbox",
        "publishable_key": None,
        "account_label": "c•••@example.com (google)",
        "auto_topup": {
            "uses": 20,
            "amount_minor": 500,
            "price": "$5.00",
            "threshold_uses": 3,
            "max_per_month": 10,
        },
    }
    assert secret not in response.text


async def test_summary_follows_the_payment_and_the_balance(api: Api) -> None:
    for _ in range(2):
        assert (await api.post("/v1/billing/charges", USER)).status_code == 201
    bought = await purchase(api)
    payment_id, secret = bought["payment_id"], bought["client_secret"]
    confirm = f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm"

    declined = await api.http.post(confirm, json={"client_secret": secret, "card_number": DECLINED})
    assert declined.status_code == 402
    body = (await summary(api, payment_id, secret)).json()
    assert (body["status"], body["payment_status"], body["credited"]) == (
        "failed",
        "requires_payment_method",
        False,
    )
    assert body["failure_message"] == "Your card has insufficient funds."

    needs_3ds = await api.http.post(
        confirm, json={"client_secret": secret, "card_number": NEEDS_3DS}
    )
    assert needs_3ds.json()["status"] == "requires_action"
    assert (await summary(api, payment_id, secret)).json()["payment_status"] == "requires_action"
    authenticated = await api.http.post(
        f"/v1/billing/sandbox/payment_intents/{payment_id}/authenticate",
        json={"client_secret": secret, "success": True},
    )
    assert authenticated.json()["status"] == "succeeded"

    body = (await summary(api, payment_id, secret)).json()
    assert (body["status"], body["payment_status"], body["credited"]) == (
        "succeeded",
        "succeeded",
        True,
    )
    assert (body["free_uses_remaining"], body["credits_remaining"]) == (1, 20)


# --- the page ---------------------------------------------------------------------------


async def test_page_is_public_static_and_has_no_secret(api: Api) -> None:
    bought = await purchase(api)
    other = await purchase(api, identity("another@example.com"))
    response = await api.http.get(page_path(bought))  # no API key
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    html = response.text

    # Nothing from the purchase is rendered: the same bytes for every payment (and for one
    # that does not exist), so the page can leak nothing and is no existence oracle.
    assert (await api.http.get(page_path(other))).text == html
    assert (await api.http.get("/v1/billing/checkout/pi_sbx_nonexistent")).text == html
    secrets_ = [
        *api.keys.values(),
        bought["client_secret"],
        other["client_secret"],
        bought["payment_id"],
        bought["account_id"],
        api.state.secrets.sandbox_webhook_secret,
    ]
    for secret in secrets_:
        assert secret not in html
    for marker in ("cbk_", "whsec_", "sk_test", "sk_live", "_secret_"):
        assert marker not in html

    # Mobile-friendly, no inline script or style, sandbox card form, no Stripe.js.
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert "<style" not in html
    assert " style=" not in html
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    assert len(scripts) == html.count("<script") == 1
    assert all(" src=" in attributes and not body.strip() for attributes, body in scripts)
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers
    assert 'data-provider="sandbox"' in html
    assert "js.stripe.com" not in html
    for field in ("card-number", "card-expiry", "card-cvc", "card-zip"):
        assert f'id="{field}"' in html
    # Inputs have no `name`: a script-less submit would send no card data anywhere.
    assert re.findall(r"<input\b[^>]*\bname=", html) == []
    # The card's four, and the auto top-up box (a checkbox).
    assert len(re.findall(r"<input\b", html)) == 5
    assert '<input id="auto-topup" type="checkbox">' in html

    # The script and style it loads are served from here, public and cacheable.
    sources = re.findall(r'(?:src|href)="(assets/[^"]+)"', html)
    assert sorted(s.split("?")[0] for s in sources) == [
        "assets/checkout.css",
        "assets/checkout.js",
    ]
    for source in sources:
        asset = await api.http.get(f"/v1/billing/checkout/{source}")
        assert asset.status_code == 200, source
        assert asset.headers["x-content-type-options"] == "nosniff"
        for secret in secrets_:
            assert secret not in asset.text
    script = (await api.http.get("/v1/billing/checkout/assets/checkout.js")).text
    assert (
        (await api.http.get("/v1/billing/checkout/assets/checkout.js"))
        .headers["content-type"]
        .startswith("text/javascript")
    )
    assert "location.hash" in script
    assert '"X-Client-Secret": secret' in script
    assert "innerHTML" not in script  # everything is written with textContent
    assert "/sandbox/payment_intents/" in script


async def test_page_headers(api: Api) -> None:
    bought = await purchase(api)
    headers = (await api.http.get(page_path(bought))).headers
    assert headers["cache-control"] == "no-store"
    assert headers["referrer-policy"] == "no-referrer"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    csp = _directives(headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]
    assert csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["frame-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["form-action"] == ["'none'"]
    assert "unsafe" not in headers["content-security-policy"]


async def test_page_is_not_in_the_api_schema(api: Api) -> None:
    schema = (await api.http.get("/openapi.json")).json()
    paths = schema["paths"]
    assert "/v1/billing/checkout/{payment_id}" not in paths
    assert "/v1/billing/checkout/{payment_id}/summary" in paths
    assert paths["/v1/billing/checkout/{payment_id}/summary"]["get"]["tags"] == ["checkout"]


def _directives(policy: str) -> dict[str, list[str]]:
    parts = (directive.split() for directive in policy.split(";"))
    return {part[0]: part[1:] for part in parts if part}


# --- Stripe mode (against localstripe: the official SDK over HTTP) ------------------------

PUBLISHABLE_KEY = "pk_test_checkout_page"
STRIPE_WEBHOOK_SECRET = "whsec_checkout_page_test"


@pytest.fixture(scope="module")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStripe]:
    with run_localstripe(tmp_path_factory.mktemp("localstripe-checkout")) as server:
        yield server


@pytest.fixture
async def stripe_api(localstripe: LocalStripe, fresh_database: str) -> AsyncIterator[Api]:
    settings = make_settings(
        fresh_database,
        payment_provider="stripe",
        stripe_api_key=TEST_API_KEY,
        stripe_webhook_secret=STRIPE_WEBHOOK_SECRET,
        stripe_publishable_key=PUBLISHABLE_KEY,
        stripe_api_base=localstripe.base_url,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        engine = app.state.billing.engine
        async with engine.begin() as conn:
            _key_id, key = await auth.create_key(conn, "test-write", frozenset({"write"}))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://billing.test") as http:
            yield Api(http, engine, {"write": key}, settings, app.state.billing)


async def test_stripe_mode_page_loads_stripe_js(stripe_api: Api) -> None:
    bought = await purchase(stripe_api)
    assert bought["payment_id"].startswith("pi_")
    response = await stripe_api.http.get(page_path(bought))
    html = response.text
    assert '<script src="https://js.stripe.com/v3/" defer></script>' in html
    assert 'data-provider="stripe"' in html
    assert 'id="payment-element"' in html
    # Stripe.js comes before the page's script (both deferred: they run in this order).
    assert html.index("https://js.stripe.com/v3/") < html.index("assets/checkout.js")
    for secret in (
        TEST_API_KEY,
        STRIPE_WEBHOOK_SECRET,
        bought["client_secret"],
        stripe_api.keys["write"],
    ):
        assert secret not in html

    csp = _directives(response.headers["content-security-policy"])
    assert "https://js.stripe.com" in csp["script-src"]
    assert "'self'" in csp["script-src"]
    assert "https://js.stripe.com" in csp["frame-src"]
    assert "https://hooks.stripe.com" in csp["frame-src"]
    assert "https://api.stripe.com" in csp["connect-src"]
    assert "unsafe" not in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["referrer-policy"] == "no-referrer"

    script = (await stripe_api.http.get("/v1/billing/checkout/assets/checkout.js")).text
    assert "window.Stripe(summary.publishable_key)" in script
    assert "stripe.elements({" in script
    assert "clientSecret: secret" in script
    assert 'elements.create("payment"' in script
    assert "stripe.confirmPayment({" in script
    assert 'redirect: "if_required"' in script


async def test_stripe_mode_summary(stripe_api: Api, localstripe: LocalStripe) -> None:
    bought = await purchase(stripe_api)
    payment_id, secret = bought["payment_id"], bought["client_secret"]
    assert (await summary(stripe_api, payment_id, secret + "x")).status_code == 404
    assert (await summary(stripe_api, payment_id, None)).status_code == 404
    response = await summary(stripe_api, payment_id, secret)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["provider"] == "stripe"
    assert body["publishable_key"] == PUBLISHABLE_KEY
    assert (body["uses"], body["price"], body["payment_status"]) == (
        20,
        "$5.00",
        "requires_payment_method",
    )

    localstripe.pay(payment_id)
    body = (await summary(stripe_api, payment_id, secret)).json()
    assert body["payment_status"] == "succeeded"  # at Stripe; credited when the webhook comes
    assert TEST_API_KEY not in response.text
    assert STRIPE_WEBHOOK_SECRET not in response.text


def test_csp_per_provider() -> None:
    sandbox = content_security_policy("sandbox")
    stripe = content_security_policy("stripe")
    assert "stripe" not in sandbox
    assert "script-src 'self' https://js.stripe.com https://*.js.stripe.com;" in stripe
