"""Finding 9 (issue 12): logs held an API key sent as `?api_key=`, emails from URL paths, SQL
parameters of failed statements, and the first admin key (on the JSON logs' stream).

A real `ciris-billing serve` runs every route of the app, succeeding and failing (no key, a key
in the query string, the wrong scope, bad bodies, a whole sandbox purchase paid with a card, a
refund, an erasure, the webhook with a bad signature, a database error), and ALL its output
(stdout and stderr) is searched for every key, secret, email and card number it was given.
"""

from __future__ import annotations

import re
import secrets
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from ciris_billing.db import create_engine
from ciris_billing.errors_http import error_response
from ciris_billing.observability import configure_logging
from tests.support.cli import create_key
from tests.support.operations import OPERATIONS
from tests.support.servers import running_service, service_env

CARD = "4242 4242 4242 4242"
EMAIL = re.compile(rb"[\w.+-]+@[\w-]+\.[\w.-]+")


def first_key(printed: str) -> str:
    """The first admin key: in a 0600 file whose path the first start printed, not printed."""
    found = re.search(r"it is in (\S+) \(readable only by this user\)", printed)
    assert found, printed[-2000:]
    path = Path(found.group(1))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    path.unlink()
    assert key.startswith("cbk_")
    return key


def concrete(template: str, email: str, payment_id: str) -> str:
    values = {"oauth_provider": "oauth:google", "external_id": email, "provider_name": "sandbox"}
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), payment_id), template)


def test_finding_9_logs_hold_no_keys_secrets_emails_or_cards(
    fresh_database: str, tmp_path: Path
) -> None:
    webhook_secret = "whsec_" + secrets.token_hex(16)
    env = service_env(fresh_database, SANDBOX_WEBHOOK_SECRET=webhook_secret)
    log_path = tmp_path / "serve.log"
    emails = [f"logs-{n}-{secrets.token_hex(3)}@example.com" for n in range(3)]
    user = {"oauth_provider": "oauth:google", "external_id": emails[0]}
    given: list[str] = [webhook_secret, CARD, CARD.replace(" ", ""), *emails]
    with running_service(env, log_path) as base, httpx.Client(base_url=base, timeout=30) as http:
        admin = first_key(log_path.read_text())
        read = create_key(env, "read")
        given += [admin, read]
        h = {"X-API-Key": admin}
        # A whole purchase: account, checks, charges, a purchase paid by card, a refund.
        assert http.post("/v1/billing/accounts", json=user, headers=h).status_code == 201
        for _ in range(4):
            http.post("/v1/billing/credits/check", json=user, headers=h)
            http.post("/v1/billing/charges", json=user, headers=h)
        bought = http.post(
            "/v1/billing/purchases", json={**user, "customer_email": emails[0]}, headers=h
        ).json()
        payment_id, client_secret = bought["payment_id"], bought["client_secret"]
        given.append(client_secret)
        paid = http.post(
            f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
            json={"client_secret": client_secret, "card_number": CARD},
        )
        assert paid.status_code == 200, paid.text
        http.post(
            f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
            json={"client_secret": client_secret + "x", "card_number": CARD},
        )
        http.get(f"/v1/billing/checkout/{payment_id}", params={"client_secret": client_secret})
        refunded = http.post(
            f"/v1/billing/purchases/{payment_id}/refund", json={"amount_minor": 100}, headers=h
        )
        assert refunded.status_code < 500, refunded.text
        # Every route: no key, the key in the query string, a read key, the admin key with a
        # body naming a user by email (paths with the email in them), and a bad body.
        for operation in OPERATIONS:
            path = concrete(operation.template, emails[1], payment_id)
            body: Any = {**user, "external_id": emails[1], "customer_email": emails[1]}
            for params, headers in (
                ({}, {}),
                ({"api_key": admin, "external_id": emails[2]}, {}),
                ({}, {"X-API-Key": read}),
                ({"oauth_provider": "oauth:google", "external_id": emails[1]}, h),
            ):
                http.request(operation.method, path, params=params, headers=headers, json=body)
            http.request(
                operation.method,
                path,
                headers=h,
                content=b'{"a": NaN, "b": "' + emails[2].encode() + b'"}',
            )
        http.post(
            "/v1/billing/webhooks/sandbox",
            content=b'{"email": "' + emails[2].encode() + b'"}',
            headers={"Stripe-Signature": f"t=1,v1={webhook_secret}"},
        )
        # A database error (erase, return, erase again: a unique violation on main), and its
        # statement's parameters.
        for _ in range(2):
            http.delete(f"/v1/billing/accounts/oauth:google/{emails[0]}", headers=h)
            http.post("/v1/billing/credits/check", json=user, headers=h)
    output = log_path.read_bytes()
    leaked = sorted({secret for secret in given if secret.encode() in output})
    assert not leaked, f"in the service's output: {leaked}"
    assert b"_secret_" not in output
    assert b"[parameters:" not in output
    assert b"DETAIL:" not in output
    assert not EMAIL.findall(output), EMAIL.findall(output)[:5]
    assert not re.search(rb"cbk_[A-Za-z0-9_-]{20,}", output)
    assert b'"event": "http_request"' in output, "the access log is on"
    assert b'"route": "/v1/billing/accounts/{oauth_provider}/{external_id}"' in output
    assert b"api_key=[redacted]" in output


async def test_finding_9_database_errors_log_no_parameters(
    database_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A failed statement's parameters (and the server's DETAIL, which repeats them) stay out
    of the log line the error handler writes."""
    configure_logging("INFO")
    engine = create_engine(database_url)
    secret_value = "dup-" + secrets.token_hex(8) + "@example.com"
    insert = text(
        "INSERT INTO api_keys (id, name, key_prefix, key_hash, scopes, created_at)"
        " VALUES (:id, :name, 'cbk_', :hash, 'read', now())"
    )
    values = {"id": secret_value, "name": secret_value, "hash": secret_value}
    try:
        async with engine.begin() as conn:
            await conn.execute(insert, values)
            with pytest.raises(DBAPIError) as failed:
                await conn.execute(insert, values)
        assert error_response(failed.value) is not None
    finally:
        await engine.dispose()
    out, err = capfd.readouterr()
    assert '"event": "database_error"' in out
    assert "UniqueViolationError" in out
    assert secret_value not in out + err
