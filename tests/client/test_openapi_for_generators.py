"""Issue 27 item 3: /openapi.json is a document generators love.

Stable, short operationIds (`createCharge`, `checkCredit`, ...), not FastAPI's
`create_charge_v1_billing_charges_post`; the one error shape `ErrorOut` declares the 422's
`errors[]`; every operation declares every error status it can answer, each with a JSON body
of the error shape; the guide's requests carry examples that the service itself accepts.
"""

from __future__ import annotations

import re
from typing import Any

from tests.client.test_openapi_client import PUBLIC, served_spec
from tests.support.api import Api, identity

# The operations the guide and the clients use: these names are a promise to generated code.
GUIDE_OPERATIONS = {
    ("post", "/v1/billing/accounts"): "createAccount",
    ("get", "/v1/billing/accounts/{oauth_provider}/{external_id}"): "getAccount",
    ("post", "/v1/billing/credits/check"): "checkCredit",
    ("post", "/v1/billing/charges"): "createCharge",
    ("get", "/v1/billing/transactions"): "listTransactions",
    ("post", "/v1/billing/purchases"): "createPurchase",
    ("get", "/v1/billing/purchases/{payment_id}"): "getPurchase",
    ("post", "/v1/billing/purchases/{payment_id}/refund"): "refundPurchase",
    ("post", "/v1/billing/reservations"): "createReservation",
    ("get", "/v1/billing/reservations"): "listReservations",
    ("get", "/v1/billing/reservations/{reservation_id}"): "getReservation",
    ("post", "/v1/billing/reservations/{reservation_id}/capture"): "captureReservation",
    ("post", "/v1/billing/reservations/{reservation_id}/release"): "releaseReservation",
    ("post", "/v1/billing/credits"): "grantCredits",
    ("post", "/v1/billing/webhook_endpoints"): "createWebhookEndpoint",
    ("post", "/v1/billing/webhooks/{provider_name}"): "receiveProviderWebhook",
    ("get", "/health"): "getHealth",
}
ERROR_SCHEMAS = {"#/components/schemas/ErrorOut", "#/components/schemas/PurchaseRequiredOut"}


def _operations(spec: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): operation
        for path, methods in spec["paths"].items()
        for method, operation in methods.items()
    }


def test_operation_ids_are_short_stable_and_unique() -> None:
    operations = _operations(served_spec())
    ids = [operation["operationId"] for operation in operations.values()]
    assert len(ids) == len(set(ids))
    for (method, path), operation in operations.items():
        # camelCase words, no path or method in them (FastAPI's default had both).
        assert re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]+)*", operation["operationId"]), (method, path)
        assert len(operation["operationId"]) <= 32, (method, path)
    assert {op: operations[op]["operationId"] for op in GUIDE_OPERATIONS} == GUIDE_OPERATIONS


def test_error_out_declares_the_422_errors_list() -> None:
    schemas = served_spec()["components"]["schemas"]
    error_out = schemas["ErrorOut"]
    assert set(error_out["required"]) == {"error", "detail"}
    errors = error_out["properties"]["errors"]
    items = next(o["items"] for o in errors.get("anyOf", [errors]) if o.get("type") == "array")
    field_error = schemas[items["$ref"].rsplit("/", 1)[-1]]
    assert set(field_error["properties"]) == {"field", "message", "type"}


def test_every_operation_declares_every_error_status_in_the_error_shape() -> None:
    for (method, path), operation in _operations(served_spec()).items():
        responses = operation["responses"]
        takes_input = bool(operation.get("parameters") or operation.get("requestBody"))
        expected = {"413", "503"} | ({"422"} if takes_input else set())
        if (method, path) not in PUBLIC and path != "/health":
            expected |= {"401", "403", "429"}
        assert expected <= responses.keys(), (method, path, expected - responses.keys())
        for status, response in responses.items():
            if not status.startswith(("4", "5")) or path == "/health":
                continue
            schema = response["content"]["application/json"]["schema"]
            refs = {s.get("$ref") for s in schema.get("anyOf", [schema])}
            assert refs <= ERROR_SCHEMAS, (method, path, status, schema)
    charge = _operations(served_spec())[("post", "/v1/billing/charges")]["responses"]
    assert charge["402"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "PurchaseRequiredOut"
    )


def test_the_guides_requests_have_examples() -> None:
    operations = _operations(served_spec())
    for op in [
        ("post", "/v1/billing/accounts"),
        ("post", "/v1/billing/credits/check"),
        ("post", "/v1/billing/charges"),
        ("post", "/v1/billing/purchases"),
        ("post", "/v1/billing/reservations"),
        ("post", "/v1/billing/reservations/{reservation_id}/capture"),
    ]:
        content = operations[op]["requestBody"]["content"]["application/json"]
        assert content["examples"], op
        for example in content["examples"].values():
            assert example["value"]["oauth_provider" if "capture" not in op[1] else "uses"]


async def test_the_examples_are_requests_the_service_accepts(api: Api) -> None:
    # The guide's order: account, check, charge, purchase, hold, capture; each example as sent.
    operations = _operations((await api.http.get("/openapi.json")).json())

    def example(method: str, path: str) -> Any:
        content = operations[(method, path)]["requestBody"]["content"]["application/json"]
        return next(iter(content["examples"].values()))["value"]

    assert (
        await api.post("/v1/billing/accounts", example("post", "/v1/billing/accounts"))
    ).is_success
    for path, expected in [
        ("/v1/billing/credits/check", 200),
        ("/v1/billing/charges", 201),
        ("/v1/billing/purchases", 201),
    ]:
        answer = await api.post(path, example("post", path))
        assert answer.status_code == expected, (path, answer.text)
    await api.post(
        "/v1/billing/credits",
        {**identity("stripe-test@example.com"), "uses": 10, "reason": "test"},
        scope="admin",
    )
    held = await api.post("/v1/billing/reservations", example("post", "/v1/billing/reservations"))
    assert held.status_code == 201, held.text
    capture = "/v1/billing/reservations/{reservation_id}/capture"
    captured = await api.post(
        capture.format(reservation_id=held.json()["reservation_id"]), example("post", capture)
    )
    assert captured.status_code == 201, captured.text
    assert captured.json()["uses"] == 3
    assert (await api.audit()).clean
