"""The operator console and the customer portal in a real headless Chromium (Debian's, driven
by Playwright), against the real service (`ciris-billing serve`, sandbox provider, PostgreSQL,
background jobs off so a failed event waits for the operator).

An operator signs in with the keyboard, finds an account by email, grants 5 uses, refunds a
purchase partially, suspends and reactivates it, and replays a failed webhook event; each is
asserted in the database and in the audit trail (with the key's name as the operator). A form
posted without its CSRF token is 403, a wrong key is refused, a session past its end goes back
to the login form. The portal of one account shows its charges and receipts; another
account's receipt or a tampered link is refused.

Screenshots of every page at desktop and phone widths go to tests/artifacts/console/ (listed
by the test run; committed). No page may scroll sideways on a phone, and no page may log a
script error or a CSP violation.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
import pytest

from tests.support.browser import Tab, chromium, open_tab
from tests.support.cli import cli
from tests.support.servers import running_service, service_env

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = pytest.mark.slow  # a real service process and headless Chromium

OPERATOR = "ops-alice"
VISA = "4242 4242 4242 4242"


@dataclass
class Service:
    base: str
    database_url: str
    admin_key: str
    write_key: str
    env: dict[str, str]

    def post(self, path: str, body: Any, key: str | None = None) -> httpx.Response:
        headers = {"X-API-Key": key or self.write_key}
        return httpx.post(self.base + path, json=body, headers=headers, timeout=30)

    def new_user(self, email: str | None = None) -> dict[str, str]:
        user = {"oauth_provider": "oauth:google", "external_id": f"u-{uuid.uuid4().hex[:12]}"}
        made = self.post(
            "/v1/billing/accounts",
            {**user, "customer_email": email, "initial_balance_minor": 0, "currency": "USD"},
        )
        assert made.status_code == 201, made.text
        return user

    def check(self, user: dict[str, str]) -> dict[str, Any]:
        body: dict[str, Any] = self.post(
            "/v1/billing/credits/check", {**user, "context": {}}
        ).json()
        return body

    def paid_purchase(self, user: dict[str, str]) -> dict[str, Any]:
        bought: dict[str, Any] = self.post(
            "/v1/billing/purchases", {**user, "customer_email": None}
        ).json()
        paid = httpx.post(
            f"{self.base}/v1/billing/sandbox/payment_intents/{bought['payment_id']}/confirm",
            json={"client_secret": bought["client_secret"], "card_number": VISA},
            timeout=30,
        )
        assert paid.json()["status"] == "succeeded", paid.text
        return bought

    def sql(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            cursor = conn.execute(statement, args)
            return cursor.fetchall() if cursor.description else []

    def account_id(self, user: dict[str, str]) -> str:
        [(found,)] = self.sql(
            "SELECT id FROM accounts WHERE oauth_provider = %s AND external_id = %s",
            user["oauth_provider"],
            user["external_id"],
        )
        return str(found)

    def trail(self, account_id: str) -> list[tuple[Any, ...]]:
        """(actor, action, detail, before, after) of the account's audit rows, oldest first."""
        return self.sql(
            "SELECT actor, action, detail, before, after FROM audit_trail "
            "WHERE account_id = %s ORDER BY created_at, id",
            account_id,
        )


@pytest.fixture(scope="module")
def service(
    new_database: Callable[[], str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    database_url = new_database()
    env = service_env(
        database_url,
        PAYMENT_PROVIDER="sandbox",
        JOBS_ENABLED="false",
        ALLOW_PRIVATE_WEBHOOK_URLS="true",
    )
    for name in ("STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "STRIPE_PUBLISHABLE_KEY"):
        env.pop(name, None)
    keys = {}
    for name, scope in ((OPERATOR, "admin"), ("agent", "write")):
        made = cli(env, "keys", "create", "--name", name, "--scopes", scope)
        assert made.returncode == 0, made.stderr
        keys[scope] = made.stdout.strip().splitlines()[-1]
    log_path = tmp_path_factory.mktemp("console-browser") / "service.log"
    with running_service(env, log_path) as base:
        yield Service(base, database_url, keys["admin"], keys["write"], env)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def shots() -> Iterator[list[Path]]:
    taken: list[Path] = []
    yield taken
    print("\nconsole screenshots:\n" + "\n".join(f"  {p}" for p in sorted(set(taken))))


@pytest.fixture
def tab(browser: Browser, shots: list[Path]) -> Iterator[Tab]:
    with open_tab(browser) as opened:
        yield opened
    shots.extend(opened.shots)


def sign_in(tab: Tab, service: Service) -> None:
    page = tab.page
    page.goto(f"{service.base}/console/login")
    page.get_by_label("Admin API key").fill(service.admin_key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{service.base}/console")


def confirm(tab: Tab, title: str, shot: str | None = None) -> None:
    """The confirmation page: nothing is done until its Confirm button."""
    from playwright.sync_api import expect

    expect(tab.page.get_by_role("heading", level=1)).to_have_text(title)
    if shot:
        tab.screenshots(shot)
    tab.page.get_by_role("button", name="Confirm").click()


def test_sign_in_with_the_keyboard_and_a_wrong_key_is_refused(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    page = tab.page
    page.goto(f"{service.base}/console")
    expect(page).to_have_url(f"{service.base}/console/login")
    expect(page.get_by_label("Admin API key")).to_be_focused()
    tab.screenshots("login")
    page.keyboard.type("cbk_this-is-not-a-key")
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_have_text("That key is not a valid admin API key.")
    expect(page.get_by_label("Admin API key")).to_have_attribute("aria-invalid", "true")
    tab.screenshots("login-refused")
    assert service.sql("SELECT count(*) FROM console_sessions") == [(0,)]
    # The agent's write key is no way in either.
    page.get_by_label("Admin API key").fill(service.write_key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_be_visible()
    page.get_by_label("Admin API key").fill(service.admin_key)
    page.keyboard.press("Enter")
    expect(page.get_by_text(f"Signed in as {OPERATOR}")).to_be_visible()
    cookie = next(c for c in page.context.cookies() if c["name"] == "ciris_console")
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/console")


def test_find_by_email_and_grant_five_uses(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    email = f"grant-{uuid.uuid4().hex[:8]}@example.com"
    user = service.new_user(email)
    account_id = service.account_id(user)
    sign_in(tab, service)
    page = tab.page
    page.get_by_label("Find an account").fill(email.upper())  # whatever its case
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(account_id)
    expect(page.locator("#paid-uses")).to_have_text("0")
    page.get_by_label("Uses (negative takes back)").fill("5")
    page.get_by_label("Reason", exact=True).fill("Support ticket 1234")
    page.get_by_role("button", name="Grant…").click()
    expect(page.get_by_text("Paid uses: 0 → 5")).to_be_visible()
    assert service.check(user)["credits_remaining"] == 0  # not before Confirm
    confirm(tab, "Grant 5 paid uses to this account?", shot="confirm-grant")
    expect(page.get_by_role("status")).to_contain_text("Done: grant")
    expect(page.locator("#paid-uses")).to_have_text("5")
    assert service.check(user)["credits_remaining"] == 5
    [(actor, action, detail, before, after)] = service.trail(account_id)
    assert (actor, action, detail["uses"]) == (OPERATOR, "grant", 5)
    assert (before["paid_uses"], after["paid_uses"]) == (0, 5)
    expect(page.locator("#audit ~ .scroll")).to_contain_text(OPERATOR)
    tab.screenshots("account")


def test_refund_a_purchase_partially(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    user = service.new_user()
    bought = service.paid_purchase(user)
    account_id = service.account_id(user)
    sign_in(tab, service)
    page = tab.page
    page.get_by_label("Find an account").fill(bought["payment_id"])
    page.keyboard.press("Enter")
    expect(page.locator("#paid-uses")).to_have_text("20")
    page.get_by_label("Amount in minor units").fill("200")
    page.get_by_role("button", name="Refund…").click()
    expect(page.get_by_text("Refund now: $2.00 (of $5.00 not yet refunded)")).to_be_visible()
    confirm(tab, "Refund this purchase?", shot="confirm-refund")
    expect(page.get_by_role("status")).to_contain_text("Done: refund")
    expect(page.locator("#paid-uses")).to_have_text("12")
    [(refunded, status)] = service.sql(
        "SELECT refunded_minor, status FROM purchases WHERE payment_id = %s", bought["payment_id"]
    )
    assert (refunded, status) == (200, "partially_refunded")
    [(actor, action, detail, before, after)] = service.trail(account_id)
    assert (actor, action, detail["amount_minor"], detail["uses_reversed"]) == (
        OPERATOR,
        "refund",
        200,
        8,
    )
    assert (before["refunded_minor"], after["refunded_minor"]) == (0, 200)


def test_suspend_and_reactivate(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    user = service.new_user()
    account_id = service.account_id(user)
    sign_in(tab, service)
    page = tab.page
    page.goto(f"{service.base}/console/accounts/{account_id}")
    page.get_by_label("Reason (optional; shown in its credit checks)").fill("abuse report")
    page.get_by_role("button", name="Suspend…").click()
    confirm(tab, "Suspend this account?", shot="confirm-suspend")
    expect(page.locator("h1 .badge")).to_have_text("suspended")
    assert service.check(user)["reason"] == "Account is suspended: abuse report"
    page.get_by_role("button", name="Reactivate…").click()
    confirm(tab, "Reactivate this account?")
    expect(page.locator("h1 .badge")).to_have_text("active")
    assert service.check(user)["has_credit"] is True
    rows = service.trail(account_id)
    assert [(r[0], r[1], r[3]["status"], r[4]["status"]) for r in rows] == [
        (OPERATOR, "suspend", "active", "suspended"),
        (OPERATOR, "reactivate", "suspended", "active"),
    ]


def _failed_event(service: Service, user: dict[str, str]) -> tuple[str, str]:
    """A purchase paid at the sandbox whose webhook handling failed: (payment id, event id)."""
    bought = service.post("/v1/billing/purchases", {**user, "customer_email": None}).json()
    payment_id = bought["payment_id"]
    event_id = f"evt_failed_{uuid.uuid4().hex[:12]}"
    payload = {
        "id": event_id,
        "object": "event",
        "type": "payment_intent.succeeded",
        "created": 1_790_000_000,
        "data": {"object": {"id": payment_id, "object": "payment_intent"}},
    }
    service.sql(
        "UPDATE sandbox_payments SET status = 'succeeded', card_brand = 'visa', "
        "card_last4 = '4242' WHERE id = %s",
        payment_id,
    )
    service.sql(
        "INSERT INTO webhook_events (id, provider, event_id, type, payment_id, payload, "
        "received_at, attempts, last_error) VALUES (%s, 'sandbox', %s, "
        "'payment_intent.succeeded', %s, %s, now(), 3, 'ProviderUnavailable')",
        f"whe_{uuid.uuid4().hex[:12]}",
        event_id,
        payment_id,
        json.dumps(payload),
    )
    return payment_id, event_id


def test_replay_a_failed_webhook_event(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    user = service.new_user()
    account_id = service.account_id(user)
    _payment_id, event_id = _failed_event(service, user)
    sign_in(tab, service)
    page = tab.page
    page.get_by_role("link", name="Webhooks").click()
    row = page.get_by_role("row").filter(has_text=event_id)
    expect(row).to_contain_text("ProviderUnavailable")
    tab.screenshots("webhooks")
    row.get_by_role("button", name="Replay…").click()
    confirm(tab, "Replay this webhook event?", shot="confirm-replay")
    expect(page.get_by_role("status")).to_contain_text("Done: replay")
    expect(page.locator("#paid-uses")).to_have_text("20")
    [(handled, outcome)] = service.sql(
        "SELECT handled_at IS NOT NULL, outcome FROM webhook_events WHERE event_id = %s", event_id
    )
    assert (handled, outcome) == (True, "credited")
    assert service.check(user)["credits_remaining"] == 20
    [(actor, action, detail, before, after)] = service.trail(account_id)
    assert (actor, action, detail["outcome"]) == (OPERATOR, "replay", "credited")
    assert (before["handled"], after["handled"]) == (False, True)


def test_a_form_without_its_csrf_token_is_refused(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    user = service.new_user()
    account_id = service.account_id(user)
    sign_in(tab, service)
    page = tab.page
    page.goto(f"{service.base}/console/accounts/{account_id}")
    page.get_by_label("Uses (negative takes back)").fill("5")
    page.get_by_label("Reason", exact=True).fill("forged")
    # A form as another site would post it: everything but the session's token.
    page.evaluate(
        '() => document.querySelector(\'form[action="/console/actions/grant"] '
        "input[name=csrf_token]').remove()"
    )
    with page.expect_response(f"{service.base}/console/actions/grant") as answer:
        page.get_by_role("button", name="Grant…").click()
    assert answer.value.status == 403
    expect(page.get_by_role("alert")).to_contain_text("no valid CSRF token")
    tab.screenshots("csrf-refused")
    assert service.check(user)["credits_remaining"] == 0
    assert service.trail(account_id) == []


def test_a_session_past_its_end_goes_back_to_login(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    sign_in(tab, service)
    page = tab.page
    # The day's figures, once the tests before have made some.
    expect(page.get_by_role("heading", level=1)).to_contain_text("Today")
    tab.screenshots("overview")
    # Two accounts with one email: the search lists both.
    shared = f"shared-{uuid.uuid4().hex[:8]}@example.com"
    ids = {service.account_id(service.new_user(shared)) for _ in range(2)}
    page.get_by_label("Find an account").fill(shared)
    page.keyboard.press("Enter")
    for account_id in ids:
        expect(page.get_by_role("link", name=account_id)).to_be_visible()
    tab.screenshots("search")
    page.get_by_role("link", name="API keys").click()
    tab.screenshots("keys")
    page.get_by_role("link", name="Audit log").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Audit log")
    tab.screenshots("audit-log")
    # Idle past CONSOLE_SESSION_IDLE_SECONDS (moved in the database: no sleeping).
    service.sql("UPDATE console_sessions SET last_seen_at = now() - interval '1 day'")
    page.get_by_role("link", name="Overview").click()
    expect(page).to_have_url(f"{service.base}/console/login")
    expect(page.get_by_label("Admin API key")).to_be_visible()


def test_create_a_key_shown_once(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    sign_in(tab, service)
    page = tab.page
    page.goto(f"{service.base}/console/keys")
    page.get_by_label("Name (who or what uses it)").fill("agent-browser")
    page.get_by_label("write").check()
    page.get_by_role("button", name="Create…").click()
    confirm(tab, "Create this API key?")
    secret = page.get_by_label("The new key").input_value()
    assert secret.startswith("cbk_")
    tab.screenshots("key-created")
    assert (
        service.post(
            "/v1/billing/credits/check", {**service.new_user(), "context": {}}, secret
        ).status_code
        == 200
    )
    page.get_by_role("link", name="Back to the keys").click()
    expect(page.get_by_role("row").filter(has_text="agent-browser")).to_contain_text("active")
    assert secret not in page.content()


def test_the_portal_shows_charges_and_receipts_of_its_own_account(
    tab: Tab, service: Service
) -> None:
    from playwright.sync_api import expect

    user = service.new_user()
    for n in range(3):
        charged = service.post("/v1/billing/charges", {**user, "description": f"Chat {n + 1}"})
        assert charged.status_code == 201
    bought = service.paid_purchase(user)
    other = service.new_user()
    others = service.paid_purchase(other)
    portal = service.check(user)["portal_url"]
    page = tab.page
    page.goto(portal)
    expect(page.get_by_role("heading", name="Your balance")).to_be_visible()
    expect(page.locator("#paid-uses")).to_have_text("20")
    expect(page.locator("#free-uses")).to_have_text("0")
    for n in range(3):
        expect(page.get_by_role("cell", name=f"Chat {n + 1}")).to_be_visible()
    expect(page.get_by_role("link", name="Buy 20 uses for $5.00")).to_be_visible()
    assert others["payment_id"] not in page.content()
    tab.screenshots("portal")
    page.get_by_role("link", name=re.compile(f"Receipt for {bought['payment_id']}")).click()
    expect(page.locator("#receipt-card")).to_have_text("Visa ending in 4242")
    expect(page.locator("#receipt-amount")).to_have_text("$5.00")
    tab.screenshots("portal-receipt")
    # Another account's receipt through this link, and a tampered link: refused.
    with page.expect_response(lambda r: "/receipts/" in r.url) as answer:
        page.goto(f"{portal}/receipts/{others['payment_id']}")
    assert answer.value.status == 404
    expect(page.get_by_role("heading", name="This link does not work")).to_be_visible()
    token = portal.rsplit("/", 1)[1]
    flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    tampered = f"{portal.rsplit('/', 1)[0]}/{flipped}"
    assert page.goto(tampered).status == 404  # type: ignore[union-attr]
    expect(page.get_by_role("heading", name="This link does not work")).to_be_visible()
    tab.screenshots("portal-refused")


def test_resend_a_failing_delivery_and_disable_its_endpoint(tab: Tab, service: Service) -> None:
    from playwright.sync_api import expect

    made = service.post(
        "/v1/billing/webhook_endpoints", {"url": "http://127.0.0.1:9/hooks"}, service.admin_key
    )
    assert made.status_code == 201, made.text
    endpoint_id = made.json()["id"]
    service.new_user()  # account.created: one event to deliver
    ran = cli(service.env, "webhook-endpoints", "deliver")  # nobody listens: it fails
    assert ran.returncode == 0, ran.stderr
    [(delivery_id, attempts)] = service.sql(
        "SELECT id, attempts FROM webhook_deliveries WHERE endpoint_id = %s AND status = "
        "'pending' ORDER BY created_at DESC LIMIT 1",
        endpoint_id,
    )
    assert attempts == 1
    sign_in(tab, service)
    page = tab.page
    expect(page.locator("#deliveries-failing")).not_to_have_text("0")
    page.get_by_role("link", name="Outgoing").click()
    section = page.locator("section.endpoint").filter(has_text=endpoint_id)
    row = section.get_by_role("row").filter(has_text=delivery_id)
    expect(row).to_contain_text("retrying")
    tab.screenshots("outgoing")
    row.get_by_role("button", name="Resend…").click()
    confirm(tab, "Resend this delivery?")
    expect(page.get_by_role("status").first).to_contain_text("Done: resend delivery")
    section = page.locator("section.endpoint").filter(has_text=endpoint_id)
    section.get_by_role("button", name="Disable…").click()
    confirm(tab, "Disable this endpoint?", shot="confirm-disable-endpoint")
    expect(
        page.locator("section.endpoint").filter(has_text=endpoint_id).locator(".badge")
    ).to_have_text("disabled")
    assert service.sql("SELECT status FROM webhook_endpoints WHERE id = %s", endpoint_id) == [
        ("disabled",)
    ]
    trail = service.sql(
        "SELECT actor, action, subject FROM audit_trail WHERE action IN "
        "('resend_delivery', 'disable_endpoint') ORDER BY created_at"
    )
    assert trail == [
        (OPERATOR, "resend_delivery", delivery_id),
        (OPERATOR, "disable_endpoint", endpoint_id),
    ]


def test_the_portal_switches_auto_topup_and_removes_the_saved_card(
    tab: Tab, service: Service
) -> None:
    from playwright.sync_api import expect

    user = service.new_user()
    bought = service.post("/v1/billing/purchases", {**user, "customer_email": None}).json()
    paid = httpx.post(
        f"{service.base}/v1/billing/sandbox/payment_intents/{bought['payment_id']}/confirm",
        json={"client_secret": bought["client_secret"], "card_number": VISA, "save_card": True},
        timeout=30,
    )
    assert paid.json()["status"] == "succeeded", paid.text
    account_id = service.account_id(user)
    page = tab.page
    page.goto(service.check(user)["portal_url"])
    expect(page.locator("#saved-card")).to_have_text("Visa ending in 4242")
    expect(page.locator("#auto-topup-state")).to_have_text("on")
    page.get_by_role("button", name="Turn auto top-up off").click()
    expect(page.get_by_role("status")).to_have_text("Auto top-up is off.")
    expect(page.locator("#auto-topup-state")).to_have_text("off")
    assert service.sql(
        "SELECT enabled FROM auto_topup_settings WHERE account_id = %s", account_id
    ) == [(False,)]
    tab.screenshots("portal-auto-topup")
    page.get_by_role("button", name="Remove saved card…").click()
    expect(page.get_by_role("heading", name="Remove your saved card?")).to_be_visible()
    tab.screenshots("portal-remove-card")
    page.get_by_role("button", name="Remove the card").click()
    expect(page.get_by_role("status")).to_have_text(
        "Your saved card was removed; auto top-up is off."
    )
    assert service.sql(
        "SELECT enabled, payment_method_id FROM auto_topup_settings WHERE account_id = %s",
        account_id,
    ) == [(False, None)]
