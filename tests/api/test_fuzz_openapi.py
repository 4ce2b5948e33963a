"""Schemathesis against the service's own /openapi.json, in process, on PostgreSQL.

Every operation is fuzzed with valid (positive) and invalid (negative) requests, authenticated
with the admin key and, in a second pass, with a read-only key. Each response must not be a
5xx, must have a status code the operation declares, and must match the declared schema for
that status. Sometimes a path parameter is replaced by a real identity or a real payment id so
the fuzzer reaches past the 404s into the operations' real work.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.specs.openapi.schemas import OpenApiSchema

from ciris_billing import auth
from ciris_billing.app import create_app
from ciris_billing.audit import AuditReport, audit
from ciris_billing.db import create_engine
from ciris_billing.payments.providers import signing
from tests.support.api import UNUSED_DATABASE_URL, make_settings
from tests.support.postgres import truncate

VISA = "4242 4242 4242 4242"
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance]
SETTINGS = settings(
    max_examples=20,
    derandomize=True,  # the same cases on every run
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
KNOWN_USER = {"oauth_provider": "oauth:google", "external_id": "fuzz@example.com"}
ERASED_USER = {"oauth_provider": "oauth:google", "external_id": "erase-me@example.com"}

SCHEMA: OpenApiSchema = schemathesis.openapi.from_dict(
    create_app(make_settings(UNUSED_DATABASE_URL)).openapi()
)
OPERATIONS = sorted(op.ok().label for op in SCHEMA.get_all_operations() if isinstance(op, Ok))


@dataclass
class Target:
    app: FastAPI
    database_url: str
    keys: dict[str, str]
    payment_ids: list[str]  # paid, unpaid, paid and disputed
    dispute_ids: list[str]


async def _make_keys(database_url: str) -> dict[str, str]:
    engine = create_engine(database_url)
    keys: dict[str, str] = {}
    try:
        async with engine.begin() as conn:
            for scope in auth.SCOPES:
                _key_id, keys[scope] = await auth.create_key(
                    conn, f"fuzz-{scope}", frozenset({scope})
                )
    finally:
        await engine.dispose()
    return keys


def _seed(client: asgi.ASGIClient, admin_key: str) -> tuple[list[str], list[str]]:
    """Real things for the fuzzer to hit: purchases paid, unpaid and disputed."""
    admin = {"X-API-Key": admin_key}
    for user in (KNOWN_USER, ERASED_USER):
        assert client.post("/v1/billing/accounts", json=user, headers=admin).status_code == 201
    payment_ids, dispute_ids = [], []
    for paid, disputed in ((True, False), (False, False), (True, True)):
        bought = client.post("/v1/billing/purchases", json=KNOWN_USER, headers=admin)
        assert bought.status_code == 201, bought.text
        body = bought.json()
        payment_id = body["payment_id"]
        payment_ids.append(payment_id)
        if paid:
            response = client.post(
                f"/v1/billing/sandbox/payment_intents/{payment_id}/confirm",
                json={"client_secret": body["client_secret"], "card_number": VISA},
            )
            assert response.json()["status"] == "succeeded", response.text
        if disputed:
            response = client.post(
                f"/v1/billing/sandbox/payment_intents/{payment_id}/dispute",
                json={"status": "needs_response"},
                headers=admin,
            )
            assert response.status_code == 200, response.text
            dispute_ids.append(response.json()["dispute_id"])
    return payment_ids, dispute_ids


@pytest.fixture(scope="module")
def target(postgres_url: str) -> Iterator[Target]:
    """The app on an emptied database, served in process by schemathesis's ASGI client (its
    lifespan runs in schemathesis's event-loop thread)."""
    database_url = postgres_url
    asyncio.run(truncate(database_url))
    keys = asyncio.run(_make_keys(database_url))
    app = create_app(make_settings(database_url, sandbox_webhook_secret=WEBHOOK_SECRET))
    try:
        with asgi.get_client(cast(Any, app)) as client:
            payment_ids, dispute_ids = _seed(client, keys["admin"])
            yield Target(app, database_url, keys, payment_ids, dispute_ids)
            assert asyncio.run(_audit(database_url)).clean
    finally:
        asgi.shutdown_lifespans()


async def _audit(database_url: str) -> AuditReport:
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            return await audit(conn)
    finally:
        await engine.dispose()


def _aim(case: Case[Any], target: Target, aim: int) -> None:
    """Point some cases (aim > 0) at real things: the known identity, a real payment, the
    active provider's webhook route."""
    parameters = case.path_parameters
    if aim == 0 or parameters is None:
        return
    if "external_id" in parameters:
        # Erasure is aimed elsewhere, so the known account stays for the other operations.
        parameters.update(KNOWN_USER if case.method != "DELETE" else ERASED_USER)
    if "payment_id" in parameters:
        parameters["payment_id"] = target.payment_ids[aim % len(target.payment_ids)]
    if "provider_name" in parameters:
        parameters["provider_name"] = "sandbox"


def fuzz(target: Target, label: str, mode: GenerationMode, scope: str, examples: int) -> None:
    operation = SCHEMA.find_operation_by_label(label)
    assert operation is not None

    @settings(SETTINGS, max_examples=examples)
    @given(case=operation.as_strategy(generation_mode=mode), aim=st.integers(0, 3))
    def run(case: Case[Any], aim: int) -> None:
        _aim(case, target, aim)
        response = case.call(app=target.app, headers={"X-API-Key": target.keys[scope]})
        checks = CHECKS + ([negative_data_rejection] if mode is GenerationMode.NEGATIVE else [])
        case.validate_response(response, checks=checks)

    try:
        run()
    except Unsatisfiable:
        # Nothing to negate: every string is a valid path parameter, and the body is optional.
        assert mode is GenerationMode.NEGATIVE, label


@pytest.mark.parametrize("label", OPERATIONS)
def test_admin_key(target: Target, label: str) -> None:
    fuzz(target, label, GenerationMode.POSITIVE, "admin", 20)
    fuzz(target, label, GenerationMode.NEGATIVE, "admin", 20)


@pytest.mark.parametrize("label", OPERATIONS)
def test_read_key(target: Target, label: str) -> None:
    fuzz(target, label, GenerationMode.POSITIVE, "read", 5)


def test_every_operation_is_fuzzed() -> None:
    assert len(OPERATIONS) >= 15
    assert "POST /v1/billing/charges" in OPERATIONS


# --- Signed webhooks with arbitrary bodies ---------------------------------------------------
# Schemathesis cannot get past the signature; these are signed with the sandbox's secret, so
# they reach the event parser and handlers. Whatever the body: a 200 or a 400, never a 5xx.

WEBHOOK_SECRET = "whsec_fuzz_openapi_test"  # set on the target app (a setting wins)
EVENT_TYPES = [
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "payment_intent.canceled",
    "payment_intent.processing",
    "charge.refunded",
    "refund.created",
    "charge.dispute.created",
    "charge.dispute.closed",
    "charge.dispute.funds_withdrawn",
    "customer.created",
]
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and ±Infinity too: json.dumps writes them and json.loads reads them
    | st.text(max_size=20)
)
JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


def _events(target: Target) -> st.SearchStrategy[Any]:
    ids = [
        *target.payment_ids,
        *target.dispute_ids,
        *("ch_" + payment_id.removeprefix("pi_") for payment_id in target.payment_ids),
    ]
    some_id = st.sampled_from(ids) | JSON
    data_object = st.fixed_dictionaries(
        {},
        optional={
            "id": some_id,
            "object": st.sampled_from(["payment_intent", "charge", "dispute"]) | JSON,
            "payment_intent": some_id,
            "charge": some_id,
            "status": st.sampled_from(["succeeded", "needs_response", "won", "lost"]) | JSON,
            "amount": st.integers(-1, 10_000) | JSON,
            "amount_refunded": st.integers(-1, 10_000) | JSON,
            "currency": st.sampled_from(["usd", "eur"]) | JSON,
        },
    )
    event = st.fixed_dictionaries(
        {
            "id": st.text(min_size=1, max_size=40).map(lambda s: "evt_fuzz_" + s) | JSON,
            "type": st.sampled_from(EVENT_TYPES) | JSON,
            "created": st.just(int(time.time())) | JSON,
            "data": st.fixed_dictionaries({"object": data_object | JSON}) | JSON,
        },
        optional={"object": st.just("event")},
    )
    return event | JSON


def test_signed_webhooks_with_any_body(target: Target) -> None:
    @settings(SETTINGS, max_examples=150)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        payload = json.dumps(data.draw(_events(target))).encode()
        headers = {
            "Content-Type": "application/json",
            "Stripe-Signature": signing.sign(payload, WEBHOOK_SECRET),
        }
        with asgi.get_client(cast(Any, target.app)) as client:
            response = client.post("/v1/billing/webhooks/sandbox", data=payload, headers=headers)
        assert response.status_code in (200, 400), (response.status_code, response.text)
        body = response.json()
        if response.status_code == 200:
            assert body["received"] is True, body
            assert isinstance(body["outcome"], str), body
        else:
            assert body["error"] == "invalid_webhook_signature", body

    run()
    assert asyncio.run(_audit(target.database_url)).clean
