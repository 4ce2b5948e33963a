"""The service with PAYMENT_PROVIDER=stripe against localstripe, as its tests drive it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support.localstripe import TEST_API_KEY, LocalStripe
from tests.support.servers import service_env

WEBHOOK_SECRET = "whsec_e2e_localstripe_secret"
PUBLISHABLE_KEY = "pk_test_e2e_publishable"


@dataclass
class Stack:
    base: str
    key: str
    stripe: LocalStripe
    env: dict[str, str]
    log_path: Path

    def post(self, path: str, body: Any, **headers: str) -> httpx.Response:
        return httpx.post(
            self.base + path, json=body, headers={"X-API-Key": self.key, **headers}, timeout=30
        )

    def get(self, path: str, **params: str) -> httpx.Response:
        return httpx.get(
            self.base + path, params=params, headers={"X-API-Key": self.key}, timeout=30
        )

    def check(self, external_id: str) -> dict[str, Any]:
        body: dict[str, Any] = self.post(
            "/v1/billing/credits/check",
            {"oauth_provider": "oauth:google", "external_id": external_id, "context": {}},
        ).json()
        return body

    def purchase(self, external_id: str) -> dict[str, Any]:
        response = self.post(
            "/v1/billing/purchases",
            {
                "oauth_provider": "oauth:google",
                "external_id": external_id,
                "customer_email": external_id,
            },
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_for_purchase(
        self, payment_id: str, status: str, timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            body: dict[str, Any] = self.get(f"/v1/billing/purchases/{payment_id}").json()
            if body["status"] == status or time.monotonic() > deadline:
                return body
            time.sleep(0.2)


def stripe_env(database_url: str, api_base: str) -> dict[str, str]:
    return service_env(
        database_url,
        PAYMENT_PROVIDER="stripe",
        STRIPE_API_KEY=TEST_API_KEY,
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        STRIPE_PUBLISHABLE_KEY=PUBLISHABLE_KEY,
        STRIPE_API_BASE=api_base,
        # These flows test the webhook path and the operator commands by hand; the background
        # jobs (which would race them) are tested in tests/faults/test_automatic_recovery.py.
        JOBS_ENABLED="false",
    )
