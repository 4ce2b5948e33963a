"""Finding 2 of issue 12, "A forged dispute destroyed paid uses (sandbox mode)".

The attack: a `charge.dispute.created` event signed with the sandbox's public default secret
held a customer's 20 paid uses, and a `charge.dispute.closed` ("lost") one removed them; the
inbox took the dispute's state from the event body when the provider did not know the dispute.
Now: no public default secret (installation secrets, stored once, the same for every worker,
instance and restart), disputes are the sandbox's own state (opened and closed by an admin),
the inbox always asks the provider, and `serve` refuses to put the sandbox on a public address
without SANDBOX_ALLOW_PUBLIC=true.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
from sqlalchemy import select

from ciris_billing.app import create_app
from ciris_billing.db import webhook_events
from ciris_billing.payments.providers import signing
from tests.support.api import Api, identity, make_settings
from tests.support.flows import VISA, check, pay, purchase

OLD_PUBLIC_DEFAULT = "whsec_sandbox_local_testing_only"
ROUTE = "/v1/billing/webhooks/sandbox"
USER = identity("disputed@example.com")


async def paid(api: Api) -> dict[str, Any]:
    bought = await purchase(api, USER)
    assert (await pay(api, bought, VISA)).json()["status"] == "succeeded"
    assert (await check(api, USER))["credits_remaining"] == 20
    return bought


def dispute_event(payment_id: str, status: str, dispute_id: str = "dp_forged_1") -> bytes:
    kind = "created" if status == "needs_response" else "closed"
    return json.dumps(
        {
            "id": f"evt_forged_{kind}_{time.monotonic_ns()}",
            "object": "event",
            "type": f"charge.dispute.{kind}",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": dispute_id,
                    "object": "dispute",
                    "charge": "ch_" + payment_id.removeprefix("pi_"),
                    "payment_intent": payment_id,
                    "status": status,
                    "amount": 500,
                    "currency": "usd",
                }
            },
        }
    ).encode()


async def send(api: Api, payload: bytes, secret: str) -> httpx.Response:
    return await api.http.post(
        ROUTE,
        content=payload,
        headers={
            "Content-Type": "application/json",
            "Stripe-Signature": signing.sign(payload, secret),
        },
    )


async def test_finding02_forged_dispute_signed_with_the_old_default_secret_is_refused(
    api: Api,
) -> None:
    bought = await paid(api)
    for status in ("needs_response", "lost"):
        forged = await send(api, dispute_event(bought["payment_id"], status), OLD_PUBLIC_DEFAULT)
        assert forged.status_code == 400, forged.text
        assert forged.json()["error"] == "invalid_webhook_signature"
    assert (await check(api, USER))["credits_remaining"] == 20
    assert (await api.audit()).clean


async def test_finding02_unknown_dispute_id_moves_no_uses_even_correctly_signed(
    api: Api,
) -> None:
    """Even with the installation's own secret (a leaked secret, a replayed body), a dispute
    the provider does not know changes nothing: money state never comes from an event body."""
    bought = await paid(api)
    secret = api.state.secrets.sandbox_webhook_secret
    for status in ("needs_response", "lost"):
        sent = await send(api, dispute_event(bought["payment_id"], status), secret)
        assert sent.status_code == 200, sent.text
    assert (await check(api, USER))["credits_remaining"] == 20
    async with api.engine.connect() as conn:
        outcomes = {row.outcome for row in await conn.execute(select(webhook_events))}
    assert "unknown_dispute" in outcomes
    assert (await api.audit()).clean


async def test_finding02_admin_opens_and_closes_a_sandbox_dispute(api: Api) -> None:
    """The only way to dispute a sandbox payment: the admin-only endpoint (the bank's side),
    kept as the sandbox's own state; its webhook then makes the inbox ask the sandbox."""
    bought = await paid(api)
    path = f"/v1/billing/sandbox/payment_intents/{bought['payment_id']}/dispute"
    refused = await api.post(path, {"status": "needs_response"}, scope="write")
    assert refused.status_code == 403
    opened = await api.post(path, {"status": "needs_response"}, scope="admin")
    assert opened.status_code == 200, opened.text
    dispute_id = opened.json()["dispute_id"]
    assert (await check(api, USER))["credits_remaining"] == 0
    found = await api.state.provider.get_dispute(dispute_id)
    assert found is not None
    assert (found.payment_id, found.state) == (bought["payment_id"], "open")
    # A forged "won" for the real dispute, correctly signed: the sandbox says it is open.
    secret = api.state.secrets.sandbox_webhook_secret
    forged = await send(api, dispute_event(bought["payment_id"], "won", dispute_id), secret)
    assert forged.status_code == 200
    assert (await check(api, USER))["credits_remaining"] == 0, "still held"
    won = await api.post(path, {"status": "won"}, scope="admin")
    assert won.status_code == 200, won.text
    assert (await check(api, USER))["credits_remaining"] == 20
    assert (await api.audit()).clean


async def test_finding02_installation_secrets_agree_across_instances_and_restarts(
    database_url: str,
) -> None:
    seen = []
    for _ in range(2):  # two instances at once on one database, then a restart of one
        first, second = (
            create_app(make_settings(database_url)),
            create_app(make_settings(database_url)),
        )
        async with first.router.lifespan_context(first), second.router.lifespan_context(second):
            a, b = first.state.billing, second.state.billing
            assert a.secrets == b.secrets
            assert a.link_secret == b.link_secret
            seen.append(a.secrets)
    assert seen[0] == seen[1]
    assert seen[0].sandbox_webhook_secret != OLD_PUBLIC_DEFAULT
    assert len(seen[0].erasure_key) >= 32
    # An environment variable still wins when set.
    pinned = create_app(make_settings(database_url, sandbox_webhook_secret="whsec_pinned_here"))
    async with pinned.router.lifespan_context(pinned):
        assert pinned.state.billing.secrets.sandbox_webhook_secret == "whsec_pinned_here"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(database_url: str, host: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ciris_billing.cli",
            "serve",
            "--host",
            host,
            "--port",
            str(_free_port()),
            "--no-migrate",
        ],
        env={**os.environ, "DATABASE_URL": database_url, "PAYMENT_PROVIDER": "sandbox", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_finding02_serve_refuses_the_sandbox_on_a_public_address(database_url: str) -> None:
    # TEST-NET first: a build without the check fails to bind it and never listens anywhere.
    for host in ("192.0.2.1", "0.0.0.0", "::"):  # noqa: S104 - refused before any bind
        refused = _serve(database_url, host)
        assert refused.returncode != 0
        assert "SANDBOX_ALLOW_PUBLIC" in refused.stderr, refused.stderr
        assert "Serving CIRIS Billing" not in refused.stdout
    # With the opt-in the check lets it through (192.0.2.1 is TEST-NET, never ours: the bind
    # itself then fails, so nothing listens anywhere).
    allowed = _serve(database_url, "192.0.2.1", SANDBOX_ALLOW_PUBLIC="true")
    assert "SANDBOX_ALLOW_PUBLIC" not in allowed.stderr
    assert "Serving CIRIS Billing" in allowed.stdout
