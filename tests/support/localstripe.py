"""Run localstripe (a fake Stripe server from PyPI) for tests, and play the customer's browser.

    with run_localstripe(tmp_path) as stripe_server:
        provider = StripeProvider("sk_test_...", "whsec_...", None, api_base=stripe_server.base_url)
        stripe_server.register_webhook("http://127.0.0.1:PORT/v1/billing/webhooks/stripe", secret)
        stripe_server.pay(payment_id)  # pm_card_visa: succeeds; a signed webhook follows (~1 s)

localstripe runs in its own process (started as `python -m tests.support.localstripe FD STATE_DIR`
from the repository root) on 127.0.0.1 only, listening on a socket the parent binds to a free port
and hands over, so there is no window in which another process could take the port. Its pickled
state goes to STATE_DIR instead of the hard-coded /tmp/localstripe.pickle, and its log (HTTP access
lines and webhook deliveries) to STATE_DIR/localstripe.log. On exit the process is stopped by its
pid: terminate, then kill.

The helpers are synchronous (plain httpx, a few milliseconds each against a local server) so
they work from sync and async fixtures alike; localstripe never calls back while answering them
(it sends webhooks from a background task ~1 s after the event), so blocking briefly is safe.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
# localstripe accepts any secret key that starts with "sk_" (and is longer than 5 characters).
TEST_API_KEY = "sk_test_localstripe"
STARTUP_TIMEOUT_SECONDS = 20.0
STATE_FILE = "localstripe.pickle"
LOG_FILE = "localstripe.log"

# Test cards localstripe knows (see localstripe/resources.py, PaymentMethod).
CARD_SUCCEEDS = "4242424242424242"
CARD_DECLINED_AT_CHARGE = "4000000000000341"  # attaches fine, the charge is declined (402)
CARD_REQUIRES_3DS = "4000002500003155"  # confirm -> requires_action -> _authenticate


@dataclass
class LocalStripe:
    """A running localstripe and the browser-side calls a customer would make."""

    base_url: str
    pid: int
    state_dir: Path
    api_key: str = TEST_API_KEY
    _webhook_count: int = field(default=0, repr=False)

    @property
    def log_path(self) -> Path:
        return self.state_dir / LOG_FILE

    # --- plumbing -------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        data: dict[str, Any] | None = None,
        *,
        json_body: Any = None,
        accept: tuple[int, ...] = (200,),
    ) -> httpx.Response:
        response = httpx.request(
            method,
            f"{self.base_url}{path}",
            data=data,
            json=json_body,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=10.0,
        )
        if response.status_code not in accept:
            raise AssertionError(
                f"localstripe {method} {path} answered {response.status_code}: {response.text}"
            )
        return response

    # --- configuration ----------------------------------------------------------------------

    def register_webhook(
        self, url: str, secret: str, events: list[str] | None = None, webhook_id: str | None = None
    ) -> str:
        """Deliver events (all, or only `events`) to `url`, signed with `secret`.

        localstripe posts every event to every registered URL ~1 s after it happens, with
        `Stripe-Signature: t=<event.created>,v1=<HMAC-SHA256(secret, f"{t}.{body}")>`, and
        never retries a failed delivery. Registering the same id again replaces it.
        """
        if webhook_id is None:
            self._webhook_count += 1
            webhook_id = f"wh_test_{self._webhook_count}"
        body: dict[str, Any] = {"url": url, "secret": secret}
        if events is not None:
            body["events"] = events
        self._request("POST", f"/_config/webhooks/{webhook_id}", json_body=body)
        return webhook_id

    def set_dispute(self, dispute_id: str, charge_id: str, status: str, amount: int) -> None:
        """The bank's side: open or close a dispute on a charge (localstripe has no disputes;
        the launcher below adds them), so `GET /v1/disputes/{id}` answers it as Stripe would.
        The service asks there: it never takes a dispute's state from an event body."""
        body = {"charge": charge_id, "status": status, "amount": amount}
        self._request("POST", f"/_config/disputes/{dispute_id}", json_body=body)

    def swap_card(self, payment_method_id: str, card_number: str) -> None:
        """The bank's side: the saved card behind `payment_method_id` now behaves as
        `card_number` does (e.g. CARD_DECLINED_AT_CHARGE: every charge is declined)."""
        body = {"card_number": card_number}
        self._request("POST", f"/_config/payment_methods/{payment_method_id}", json_body=body)

    def flush(self) -> None:
        """Forget every object (registered webhooks stay)."""
        self._request("DELETE", "/_config/data")

    # --- the customer's browser -------------------------------------------------------------

    def create_card_payment_method(self, number: str) -> str:
        """A card PaymentMethod for a test card number (16 digits); returns its pm_ id."""
        response = self._request(
            "POST",
            "/v1/payment_methods",
            {
                "type": "card",
                "card[number]": number,
                "card[exp_month]": "12",
                "card[exp_year]": "2030",
                "card[cvc]": "123",
            },
        )
        payment_method_id: str = response.json()["id"]
        return payment_method_id

    def pay(
        self, payment_id: str, payment_method: str = "pm_card_visa", save_card: bool = False
    ) -> dict[str, Any]:
        """Attach `payment_method` to the PaymentIntent, then confirm it; returns the result.
        `save_card`: the payer's consent to keep the card, `setup_future_usage=off_session`
        (Stripe.js sends it with the confirmation; localstripe's confirm takes no parameter,
        so it goes on the update just before).

        `payment_method` is a pm_ id from create_card_payment_method or one of the canonical
        test ids localstripe knows: pm_card_visa (succeeds), pm_card_chargeCustomerFail (the
        charge is declined), pm_card_visa_chargeDeclined (NOT declined by a PaymentIntent in
        localstripe: it only declines attaching to a customer).

        A declined charge answers 402 with an error body; this then returns the PaymentIntent
        as it now is (status requires_payment_method, last_payment_error set). A 3DS card
        leaves it in requires_action: call authenticate() next.
        """
        path = f"/v1/payment_intents/{payment_id}"
        update = {"payment_method": payment_method}
        if save_card:
            update["setup_future_usage"] = "off_session"
        self._request("POST", path, update)
        response = self._request("POST", f"{path}/confirm", accept=(200, 402))
        if response.status_code == 402:
            return self.retrieve(payment_id)
        result: dict[str, Any] = response.json()
        return result

    def authenticate(
        self, payment_id: str, client_secret: str, success: bool = True
    ) -> dict[str, Any]:
        """Complete (or fail) the 3DS step of a PaymentIntent in requires_action.

        Success charges the card (webhook payment_intent.succeeded follows). Failure sends the
        PaymentIntent back to requires_payment_method with last_payment_error set and, in
        localstripe, sends NO payment_intent.payment_failed webhook.
        """
        response = self._request(
            "POST",
            f"/v1/payment_intents/{payment_id}/_authenticate",
            {"client_secret": client_secret, "success": "true" if success else "false"},
            accept=(200, 402),
        )
        if response.status_code == 402:
            return self.retrieve(payment_id)
        result: dict[str, Any] = response.json()
        return result

    def retrieve(self, payment_id: str) -> dict[str, Any]:
        """The PaymentIntent as localstripe has it (latest_charge is embedded, not an id)."""
        result: dict[str, Any] = self._request("GET", f"/v1/payment_intents/{payment_id}").json()
        return result


def _wait_until_answering(process: subprocess.Popen[bytes], base_url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"localstripe exited with {process.returncode} at start-up:\n"
                + log_path.read_text(errors="replace")
            )
        try:
            # Any answer will do (this one is a 404): GET has no side effects here, unlike
            # GET /v1/balance, which emits a balance.available event.
            httpx.get(
                f"{base_url}/v1/charges/ch_probe",
                headers={"Authorization": f"Bearer {TEST_API_KEY}"},
                timeout=1.0,
            )
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"localstripe did not answer within {STARTUP_TIMEOUT_SECONDS} s:\n"
                    + log_path.read_text(errors="replace")
                ) from None
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


@contextlib.contextmanager
def run_localstripe(state_dir: Path) -> Iterator[LocalStripe]:
    """Start localstripe on 127.0.0.1 (free port), state in `state_dir`; stop it on exit."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / LOG_FILE
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        listener.set_inheritable(True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.localstripe",
                    str(listener.fileno()),
                    str(state_dir),
                ],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=(listener.fileno(),),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
    finally:
        listener.close()  # the child holds its own copy
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_until_answering(process, base_url, log_path)
        yield LocalStripe(base_url=base_url, pid=process.pid, state_dir=state_dir)
    finally:
        _stop(process)


# --- the launcher (runs in the child process) ---------------------------------------------------


def _accept_receipt_email(resources: Any) -> None:
    """Stripe's PaymentIntent takes `receipt_email` (where the receipt goes) and shows it back;
    localstripe 1.15.10 refuses it ("Unexpected receipt_email"). Teach it just that parameter,
    validated as Stripe does (a string with an @), so tests can read it back."""
    original = resources.PaymentIntent.__init__

    def __init__(self: Any, *args: Any, receipt_email: Any = None, **kwargs: Any) -> None:
        if receipt_email is not None and (
            not isinstance(receipt_email, str) or "@" not in receipt_email
        ):
            raise resources.UserError(400, "Invalid receipt_email")
        original(self, *args, **kwargs)
        self.receipt_email = receipt_email

    resources.PaymentIntent.__init__ = __init__


def _save_cards(resources: Any) -> None:
    """Saved cards as Stripe has them and localstripe 1.15.10 lacks: a PaymentIntent takes
    `setup_future_usage` (at creation or by update, "" unsets it) and, once it succeeds with a
    customer, attaches its payment method to that customer; PaymentIntents can be listed by
    `customer`."""
    intent = resources.PaymentIntent
    original_init = intent.__init__
    original_success = intent._on_success
    original_list = intent._api_list_all.__func__

    def __init__(self: Any, *args: Any, setup_future_usage: Any = None, **kwargs: Any) -> None:
        if setup_future_usage not in (None, "", "off_session", "on_session"):
            raise resources.UserError(400, "Invalid setup_future_usage")
        original_init(self, *args, **kwargs)
        self.setup_future_usage = setup_future_usage or None

    def _on_success(self: Any) -> None:
        if self.setup_future_usage and self.customer and self.payment_method:
            resources.PaymentMethod._api_retrieve(self.payment_method).customer = self.customer
        original_success(self)

    def _api_list_all(
        cls: Any, url: str, customer: Any = None, limit: Any = None, starting_after: Any = None
    ) -> Any:
        found = original_list(cls, url, limit=limit, starting_after=starting_after)
        if customer is not None:
            found._list = [item for item in found._list if item.customer == customer]
        return found

    intent.__init__ = __init__
    intent._on_success = _on_success
    intent._api_list_all = classmethod(_api_list_all)


def _serve(fd: int, state_dir: Path) -> None:
    from aiohttp import web
    from localstripe import resources, server  # type: ignore[import-untyped]

    state_file = state_dir / STATE_FILE

    def dump_to_disk(store: dict[str, Any]) -> None:
        with state_file.open("wb") as f:
            pickle.dump(store, f, protocol=pickle.HIGHEST_PROTOCOL)

    def try_load_from_disk(store: dict[str, Any]) -> None:
        with contextlib.suppress(FileNotFoundError), state_file.open("rb") as f:
            old = pickle.load(f)  # noqa: S301 - our own file, written by this function's twin
            store.clear()
            store.update(old)

    _accept_receipt_email(resources)
    _save_cards(resources)
    resources.Store.dump_to_disk = dump_to_disk
    resources.Store.try_load_from_disk = try_load_from_disk
    resources.store.try_load_from_disk()  # a restart on the same state_dir keeps its objects

    _add_disputes(server.app)
    _add_card_swaps(server.app, resources)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sock = socket.socket(fileno=fd)
    web.run_app(server.app, sock=sock, print=None, handle_signals=True)


def _add_disputes(app: Any) -> None:
    """Disputes for localstripe, which has none: set by the test (the bank's side), read by
    the service through the Stripe SDK (`GET /v1/disputes/{id}`, Stripe's shape and 404)."""
    from aiohttp import web

    disputes: dict[str, dict[str, Any]] = {}

    async def set_dispute(request: web.Request) -> web.Response:
        dispute_id = request.match_info["id"]
        disputes[dispute_id] = {
            "id": dispute_id,
            "object": "dispute",
            "currency": "usd",
            "payment_intent": None,
            **(await request.json()),
        }
        return web.json_response(disputes[dispute_id])

    async def get_dispute(request: web.Request) -> web.Response:
        found = disputes.get(request.match_info["id"])
        if found is None:
            error = {"type": "invalid_request_error", "code": "resource_missing"}
            return web.json_response({"error": {**error, "message": "No such dispute"}}, status=404)
        return web.json_response(found)

    app.router.add_route("POST", "/_config/disputes/{id}", set_dispute)
    app.router.add_route("GET", "/v1/disputes/{id}", get_dispute)


def _add_card_swaps(app: Any, resources: Any) -> None:
    """The bank's side of a saved card (tests): the card behind a payment method changes (it
    starts being declined, say), `POST /_config/payment_methods/{id}` {"card_number": ...}."""
    from aiohttp import web

    async def swap(request: web.Request) -> web.Response:
        method = resources.PaymentMethod._api_retrieve(request.match_info["id"])
        number = (await request.json())["card_number"]
        method._card_number = number
        method.card["last4"] = number[-4:]
        return web.json_response({"id": method.id})

    app.router.add_route("POST", "/_config/payment_methods/{id}", swap)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), Path(sys.argv[2]))
