"""Issue 25 item 4 in a real headless Chromium against the real service (`ciris-billing
serve`, sandbox provider): the overview's four charts are images with accessible names, the
reports page shows its tables and its CSV links download CSV; screenshots at desktop and phone
widths go to tests/artifacts/console/reports-*.png, and no page scrolls sideways on a phone
or logs a script error or a CSP violation (tests/support/browser.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.support.browser import Tab, chromium, open_tab
from tests.support.cli import cli
from tests.support.servers import running_service, service_env

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.slow  # a real service process and headless Chromium

VISA = "4242 4242 4242 4242"


@pytest.fixture(scope="module")
def service(
    new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    env = service_env(new_database(), PAYMENT_PROVIDER="sandbox", JOBS_ENABLED="false")
    for name in ("STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_PUBLISHABLE_KEY"):
        env.pop(name, None)
    made = cli(env, "keys", "create", "--name", "ops", "--scopes", "admin,write")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    log_path = tmp_path_factory.mktemp("reports-browser") / "service.log"
    with running_service(env, log_path) as base:
        yield base, key


def history(base: str, key: str) -> None:
    """Three weeks of buying and spending (the test clock moves the service's days)."""

    def post(path: str, body: object) -> httpx.Response:
        return httpx.post(base + path, json=body, headers={"X-API-Key": key}, timeout=30)

    for step in range(7):
        for n in range(step % 3 + 1):
            user = {"oauth_provider": "oauth:google", "external_id": f"b-{uuid.uuid4().hex[:8]}"}
            bought = post("/v1/billing/purchases", {**user, "customer_email": None}).json()
            paid = httpx.post(
                f"{base}/v1/billing/sandbox/payment_intents/{bought['payment_id']}/confirm",
                json={"client_secret": bought["client_secret"], "card_number": VISA},
                timeout=30,
            )
            assert paid.json()["status"] == "succeeded", paid.text
            assert post("/v1/billing/charges", {**user, "uses": 3 + n + step}).status_code == 201
        assert post("/v1/billing/test_clock/advance", {"seconds": 3 * 86_400}).status_code == 200


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    with open_tab(browser) as opened:
        yield opened
    print("\nreports screenshots:\n" + "\n".join(f"  {p}" for p in opened.shots))


def test_charts_and_reports_in_a_browser(tab: Tab, service: tuple[str, str]) -> None:
    from playwright.sync_api import expect

    base, key = service
    history(base, key)
    page = tab.page
    page.goto(f"{base}/console/login")
    page.get_by_label("Admin API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base}/console")
    for name in (
        "Uses per day",
        "Revenue recognized per day (USD)",
        "Deferred revenue (unused paid uses, USD) at the end of each day",
        "New and converting accounts per day",
    ):
        expect(page.get_by_role("img", name=name)).to_be_visible()
    tab.screenshots("reports-overview")
    page.get_by_role("link", name="90 days").click()
    expect(page.get_by_role("heading", name="The last 90 days")).to_be_visible()

    page.get_by_role("link", name="Reports and CSV").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("Reports")
    expect(page.locator("#revenue tbody tr")).to_have_count(30)
    page.get_by_label("Per").select_option("month")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#revenue tbody tr").first).to_be_visible()
    tab.screenshots("reports-page")
    with page.expect_download() as download:
        page.locator("#revenue-csv").click()
    path = download.value.path()
    assert path is not None
    with open(path, encoding="utf-8") as text:
        assert text.readline().startswith("period,currency,purchases_minor")
