"""The payment page in a real headless Chromium (Debian's `chromium`, driven by Playwright).

Against the real service (`ciris-billing serve`, sandbox provider, PostgreSQL): open the checkout
link, pay with the guide's test cards, see success / decline / "authentication required", and
check through the API that the uses arrived. Everything runs on a phone-sized screen
(390x844), which must never scroll sideways.

Needs `apt-get install chromium` (/usr/bin/chromium, or CHROMIUM_PATH) and the `playwright`
package (its own driver; no `playwright install`: the browser is Debian's). Without them this
module is skipped with the reason, except under CI=true, where that is a failure.

Screenshots go to tests/artifacts/ (not in git); their paths are printed.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from ciris_billing.checkout import checkout_url
from tests.support.browser import PHONE, chromium
from tests.support.cli import create_key
from tests.support.servers import running_service, service_env

pytestmark = pytest.mark.slow  # a real service process and headless Chromium

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

VISA = "4242 4242 4242 4242"
DECLINED = "4000 0000 0000 9995"
NEEDS_3DS = "4000 0025 0000 3155"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@dataclass
class Service:
    base: str
    key: str
    log_path: Path

    def post(self, path: str, body: Any) -> httpx.Response:
        return httpx.post(self.base + path, json=body, headers={"X-API-Key": self.key}, timeout=30)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.base + path, headers={"X-API-Key": self.key}, timeout=30)

    def check(self, user: dict[str, str]) -> dict[str, Any]:
        response = self.post("/v1/billing/credits/check", {**user, "context": {}})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def purchase(self, user: dict[str, str]) -> dict[str, Any]:
        response = self.post("/v1/billing/purchases", {**user, "customer_email": None})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def link(self, bought: dict[str, Any]) -> str:
        return checkout_url(self.base, bought["payment_id"], bought["client_secret"])


@pytest.fixture(scope="module")
def service(
    new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    directory = tmp_path_factory.mktemp("checkout-browser")
    env = service_env(new_database(), PAYMENT_PROVIDER="sandbox")
    for name in ("STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_PUBLISHABLE_KEY"):
        env.pop(name, None)
    key = create_key(env, "write")
    log_path = directory / "service.log"
    with running_service(env, log_path) as base:
        yield Service(base, key, log_path)


@dataclass
class Tab:
    """A phone-sized page that records what it sent and any script or CSP error."""

    page: Page
    requests: list[Request] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def assert_fits_the_screen(self) -> None:
        widths = self.page.evaluate(
            "() => [document.documentElement.scrollWidth, document.body.scrollWidth,"
            " window.innerWidth]"
        )
        assert max(widths[0], widths[1]) <= widths[2], f"horizontal scroll: {widths}"

    def fill_card(self, number: str) -> None:
        self.page.get_by_label("Card number").fill(number)
        self.page.get_by_label("Expiry").fill("12 / 34")
        self.page.get_by_label("CVC").fill("123")
        self.page.get_by_label("ZIP").fill("94103")

    def pay(self, number: str) -> None:
        self.fill_card(number)
        self.page.get_by_role("button", name="Pay $5.00").click()


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context(
        viewport=PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    opened = Tab(page)
    page.on("request", lambda request: opened.requests.append(request))
    page.on("pageerror", lambda error: opened.problems.append(f"page error: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        # A 402 or 404 answer is logged by Chromium as "Failed to load resource": expected.
        if message.type == "error" and "Failed to load resource" not in message.text:
            opened.problems.append(f"console: {message.text}")

    page.on("console", on_console)
    try:
        yield opened
    finally:
        context.close()
    assert opened.problems == [], opened.problems  # no CSP violation, no script error


def new_user() -> dict[str, str]:
    return {"oauth_provider": "oauth:google", "external_id": f"{uuid.uuid4().hex}@example.com"}


def screenshot(tab: Tab, name: str, capsys: pytest.CaptureFixture[str]) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    tab.page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    with capsys.disabled():
        print(f"\ncheckout screenshot: {path}")
    return path


def test_pay_with_4242_adds_20_uses(
    tab: Tab, service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    user = new_user()
    for _ in range(3):  # the guide's flow: free uses spent, a purchase is required
        assert service.post("/v1/billing/charges", user).status_code == 201
    assert service.check(user)["purchase_required"] is True
    bought = service.purchase(user)
    secret = bought["client_secret"]
    page = tab.page

    page.goto(service.link(bought))
    expect(page.get_by_role("heading", name="Buy 20 uses for $5.00")).to_be_visible()
    expect(page.locator("#balance")).to_have_text("You have 0 free uses and 0 paid uses left.")
    expect(page.get_by_text("Sandbox: test cards only")).to_be_visible()
    tab.assert_fits_the_screen()
    # The secret is in the page's script only: never in the document.
    assert secret not in page.content()

    tab.fill_card(VISA)
    tab.assert_fits_the_screen()
    screenshot(tab, "checkout-offer.png", capsys)
    page.get_by_role("button", name="Pay $5.00").click()
    expect(page.locator("#success-title")).to_have_text("Payment successful — 20 uses added")
    expect(page.locator("#success-balance")).to_have_text(
        "You now have 0 free uses and 20 paid uses left."
    )
    tab.assert_fits_the_screen()
    screenshot(tab, "checkout-success.png", capsys)

    after = service.check(user)
    assert (after["has_credit"], after["credits_remaining"], after["purchase_required"]) == (
        True,
        20,
        False,
    )
    assert service.get(f"/v1/billing/purchases/{bought['payment_id']}").json()["status"] == (
        "succeeded"
    )

    # What left the browser: only the card number (and the secret) to confirm; never the
    # expiry, CVC or ZIP; the secret in no URL and no Referer; no request but to this service.
    confirms = [r for r in tab.requests if r.url.endswith("/confirm")]
    assert len(confirms) == 1
    assert confirms[0].post_data_json == {
        "client_secret": secret,
        "card_number": "4242424242424242",
        "save_card": False,  # the box was not ticked
    }
    for request in tab.requests:
        assert request.url.startswith(service.base), request.url
        assert secret not in request.url
        assert not request.headers.get("referer"), request.url  # Referrer-Policy: no-referrer
        for value in ("12 / 34", "1234", "94103"):
            assert value not in (request.post_data or "")
    summaries = [r for r in tab.requests if r.url.endswith("/summary")]
    assert summaries
    assert all(r.headers["x-client-secret"] == secret for r in summaries)
    assert secret not in service.log_path.read_text()

    # Opening the link again shows the purchase as done, not a second payment form.
    page.reload()
    expect(page.locator("#success-title")).to_have_text("This purchase is complete — 20 uses added")
    expect(page.locator("#card-form")).to_be_hidden()


def test_declined_card_then_authentication(
    tab: Tab, service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    user = new_user()
    bought = service.purchase(user)
    page = tab.page
    page.goto(service.link(bought))
    expect(page.get_by_role("heading", name="Buy 20 uses for $5.00")).to_be_visible()
    expect(page.locator("#balance")).to_have_text("You have 3 free uses and 0 paid uses left.")

    tab.pay(DECLINED)
    declined = page.locator("#declined")
    expect(declined).to_be_visible()
    expect(declined.get_by_role("heading")).to_have_text("Payment declined")
    expect(page.locator("#declined-detail")).to_have_text("Your card has insufficient funds.")
    expect(page.locator("#card-form")).to_be_hidden()
    tab.assert_fits_the_screen()
    screenshot(tab, "checkout-declined.png", capsys)
    assert service.check(user)["credits_remaining"] == 0

    # Try another card: this one needs 3-D Secure.
    page.get_by_role("button", name="Try another card").click()
    expect(page.get_by_label("Card number")).to_have_value("")
    expect(page.get_by_label("Card number")).to_be_focused()
    tab.pay(NEEDS_3DS)
    expect(page.get_by_role("heading", name="Authentication required")).to_be_visible()
    tab.assert_fits_the_screen()
    screenshot(tab, "checkout-authentication.png", capsys)
    assert service.check(user)["credits_remaining"] == 0

    page.get_by_role("button", name="Complete authentication").click()
    expect(page.locator("#success-title")).to_have_text("Payment successful — 20 uses added")
    expect(page.locator("#success-balance")).to_have_text(
        "You now have 3 free uses and 20 paid uses left."
    )
    assert service.check(user)["credits_remaining"] == 20


def test_failed_authentication_then_another_card(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    user = new_user()
    bought = service.purchase(user)
    page = tab.page
    page.goto(service.link(bought))
    tab.pay(NEEDS_3DS)
    page.get_by_role("button", name="Fail authentication").click()
    expect(page.locator("#declined-detail")).to_have_text(
        "The provided PaymentMethod has failed authentication."
    )
    assert service.check(user)["credits_remaining"] == 0
    page.get_by_role("button", name="Try another card").click()
    tab.pay(VISA)
    expect(page.locator("#success-title")).to_have_text("Payment successful — 20 uses added")
    assert service.check(user)["credits_remaining"] == 20


def test_card_details_are_checked_before_anything_is_sent(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    bought = service.purchase(new_user())
    page = tab.page
    page.goto(service.link(bought))
    tab.fill_card("4242 4242 4242 4241")  # fails the Luhn check
    page.get_by_role("button", name="Pay $5.00").click()
    expect(page.locator("#card-problem")).to_have_text("Check the card number.")
    expect(page.get_by_label("Card number")).to_have_attribute("aria-invalid", "true")
    tab.fill_card(VISA)
    page.get_by_label("Expiry").fill("01 / 20")
    page.get_by_role("button", name="Pay $5.00").click()
    expect(page.locator("#card-problem")).to_have_text("This card has expired.")
    page.get_by_label("Expiry").fill("12 / 34")
    page.get_by_label("CVC").fill("12")
    page.get_by_role("button", name="Pay $5.00").click()
    expect(page.locator("#card-problem")).to_have_text("Enter the 3 or 4 digit CVC.")
    assert not [r for r in tab.requests if "/sandbox/" in r.url]
    # Still fits on the narrowest common phone.
    page.set_viewport_size({"width": 320, "height": 640})
    tab.assert_fits_the_screen()


def test_a_wrong_or_incomplete_link_says_so(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    bought = service.purchase(new_user())
    page = tab.page
    for url in (
        service.link({**bought, "client_secret": bought["client_secret"] + "x"}),
        f"{service.base}/v1/billing/checkout/{bought['payment_id']}",  # no fragment
        service.link({**bought, "payment_id": "pi_sbx_unknown"}),
    ):
        page.goto(url)
        expect(page.get_by_role("heading", name="This payment link does not work")).to_be_visible()
        expect(page.locator("#offer")).to_be_hidden()


def test_the_auto_topup_box_saves_the_card(
    tab: Tab, service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    from playwright.sync_api import expect

    user = new_user()
    bought = service.purchase(user)
    page = tab.page

    page.goto(service.link(bought))
    box = page.get_by_label("Top up 20 uses automatically when I run low")
    expect(box).to_be_visible()
    expect(box).not_to_be_checked()
    box.check()
    tab.assert_fits_the_screen()
    screenshot(tab, "checkout-auto-topup.png", capsys)
    tab.pay(VISA)
    expect(page.locator("#success-title")).to_have_text("Payment successful — 20 uses added")

    # The consent went with the confirmation itself; the account now has auto top-up with
    # the card's last 4. (Then the page asked the service to confirm the payment: issue 22
    # item 4.)
    posts = [r for r in tab.requests if r.method == "POST"]
    assert [r.url.rsplit("/", 1)[-1] for r in posts] == ["confirm", "sync"]
    assert (posts[0].post_data_json or {})["save_card"] is True
    shown = service.get(
        f"/v1/billing/accounts/oauth:google/{user['external_id']}/auto_topup"
    ).json()
    assert (shown["enabled"], shown["card_brand"], shown["card_last4"]) == (True, "visa", "4242")


def test_issue21_finding04_the_page_names_the_account_and_only_the_payer_ticks(
    tab: Tab, service: Service, capsys: pytest.CaptureFixture[str]
) -> None:
    """The attacker's own purchase, "pre-ticked" through the old route before the link is
    passed on: the page starts unticked, says whose account gets the uses and what auto
    top-up would charge; paid without ticking, no card is kept on the attacker's account."""
    from playwright.sync_api import expect

    attacker = new_user()
    bought = service.purchase(attacker)
    preset = httpx.post(
        f"{service.base}/v1/billing/checkout/{bought['payment_id']}/auto_topup",
        json={"enabled": True},
        headers={"X-Client-Secret": bought["client_secret"]},
        timeout=30,
    )
    assert preset.status_code in (404, 405), preset.text
    page = tab.page

    page.goto(service.link(bought))
    label = f"{attacker['external_id'][0]}•••@example.com (google)"
    expect(page.locator("#account-line")).to_have_text(f"The uses go to the account {label}.")
    expect(page.get_by_label("Top up 20 uses automatically when I run low")).not_to_be_checked()
    expect(page.locator("#auto-topup-terms")).to_have_text(
        f"If you tick this, your card will be charged $5.00 automatically for 20 uses on the "
        f"account {label} each time fewer than 3 uses are left, at most 10 times a month."
    )
    assert attacker["external_id"] not in page.content()
    tab.assert_fits_the_screen()
    screenshot(tab, "checkout-account-and-terms.png", capsys)
    tab.pay(VISA)
    expect(page.locator("#success-title")).to_have_text("Payment successful — 20 uses added")

    confirms = [r for r in tab.requests if r.url.endswith("/confirm")]
    assert [(r.post_data_json or {}).get("save_card") for r in confirms] == [False]
    shown = service.get(
        f"/v1/billing/accounts/oauth:google/{attacker['external_id']}/auto_topup"
    ).json()
    assert (shown["enabled"], shown["card_saved"]) == (False, False)
