"""What /openapi.json says beyond the routes themselves, for client generators: short, stable
operationIds and the guide's request examples.

The operationIds are a promise to generated code (`billing.createCharge(...)`), so they are
written down here, keyed by the route function's name, rather than derived from the path and
method (FastAPI's `create_charge_v1_billing_charges_post`). A route not listed gets its
function name in camelCase; tests/client/test_openapi_for_generators.py pins the guide's.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

OPERATION_IDS = {
    # accounts, checks, charges, the ledger
    "create_account": "createAccount",
    "get_account": "getAccount",
    "check_credit": "checkCredit",
    "create_charge": "createCharge",
    "list_transactions": "listTransactions",
    # holds
    "create_reservation": "createReservation",
    "list_reservations": "listReservations",
    "get_reservation": "getReservation",
    "capture_reservation": "captureReservation",
    "release_reservation": "releaseReservation",
    # operators
    "grant_credits": "grantCredits",
    "suspend_account": "suspendAccount",
    "reactivate_account": "reactivateAccount",
    "set_low_balance_threshold": "setLowBalanceThreshold",
    "export_account": "exportAccount",
    "erase_account": "eraseAccount",
    # lots
    "list_lots": "listLots",
    "void_lot": "voidLot",
    "get_auto_topup": "getAutoTopup",
    "put_auto_topup": "updateAutoTopup",
    "delete_auto_topup": "deleteAutoTopup",
    # purchases and the payment page
    "create_purchase": "createPurchase",
    "get_purchase": "getPurchase",
    "refund_purchase": "refundPurchase",
    "sync_purchase": "syncPurchase",
    "checkout_sync": "syncCheckout",
    "checkout_summary": "getCheckoutSummary",
    "checkout_auto_topup": "setCheckoutAutoTopup",
    "buy": "openBuyLink",
    "receive_webhook": "receiveProviderWebhook",
    "sandbox_confirm": "sandboxConfirmPayment",
    "sandbox_authenticate": "sandboxAuthenticatePayment",
    "sandbox_dispute": "sandboxDisputePayment",
    "sandbox_dashboard_refund": "sandboxDashboardRefund",
    "get_test_clock": "getTestClock",
    "advance_test_clock": "advanceTestClock",
    # events out
    "create_endpoint": "createWebhookEndpoint",
    "list_endpoints": "listWebhookEndpoints",
    "get_endpoint": "getWebhookEndpoint",
    "delete_endpoint": "deleteWebhookEndpoint",
    "rotate_secret": "rotateWebhookEndpointSecret",
    "disable_endpoint": "disableWebhookEndpoint",
    "enable_endpoint": "enableWebhookEndpoint",
    "list_deliveries": "listWebhookDeliveries",
    "resend_delivery": "resendWebhookDelivery",
    "health": "getHealth",
}

_USER = {"oauth_provider": "oauth:google", "external_id": "stripe-test@example.com"}
# The guide's requests (README "The guide's manual test"), by operationId.
EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "createAccount": {
        "guide": {
            "summary": "A new account with its free uses",
            "value": {
                **_USER,
                "initial_balance_minor": 0,
                "currency": "USD",
                "plan_name": "free",
            },
        }
    },
    "checkCredit": {
        "guide": {"summary": "May this user go on?", "value": {**_USER, "context": {}}}
    },
    "createCharge": {
        "guide": {
            "summary": "One use (send an Idempotency-Key header)",
            "value": {
                **_USER,
                "amount_minor": 100,
                "currency": "USD",
                "description": "Free use test",
                "metadata": {},
            },
        }
    },
    "createPurchase": {
        "guide": {
            "summary": "Buy a pack of uses",
            "value": {**_USER, "customer_email": "stripe-test@example.com"},
        }
    },
    "createReservation": {
        "guide": {
            "summary": "Hold 5 uses for 2 minutes",
            "value": {**_USER, "uses": 5, "ttl_seconds": 120, "metadata": {"task": "report"}},
        }
    },
    "captureReservation": {
        "guide": {
            "summary": "Charge 3 of the held uses; the rest go back",
            "value": {"uses": 3, "description": "Report"},
        }
    },
}


def operation_id(route: APIRoute) -> str:
    """The route's operationId: the table's, else its function name in camelCase."""
    known = OPERATION_IDS.get(route.name)
    if known is not None:
        return known
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


def install(app: FastAPI) -> None:
    """Serve the document with the guide's examples on its request bodies."""

    built = app.openapi  # FastAPI's own: builds the document once and keeps it

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = built()
            for methods in schema.get("paths", {}).values():
                for operation in methods.values():
                    examples = EXAMPLES.get(operation.get("operationId", ""))
                    content = operation.get("requestBody", {}).get("content", {})
                    if examples is not None and "application/json" in content:
                        content["application/json"]["examples"] = examples
        return app.openapi_schema or built()

    app.openapi = openapi  # type: ignore[method-assign]
