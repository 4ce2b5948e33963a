"""`ciris-billing webhook-endpoints ...`: the API's twins, and `deliver` (one run now)."""

from __future__ import annotations

import json
import os

from tests.support.api import Api, identity
from tests.support.cli import cli
from tests.support.receiver import receiving


async def test_webhook_endpoints_commands(api: Api) -> None:
    env = {**os.environ, "DATABASE_URL": api.database_url, "ALLOW_PRIVATE_WEBHOOK_URLS": "true"}
    strict = {**os.environ, "DATABASE_URL": api.database_url}
    refused = cli(strict, "webhook-endpoints", "create", "http://127.0.0.1:9/hooks")
    assert refused.returncode == 1
    assert "webhook_url_refused" in refused.stderr
    with receiving() as receiver:
        made = cli(env, "webhook-endpoints", "create", receiver.url, "--event", "account.created")
        assert made.returncode == 0, made.stderr
        endpoint = json.loads(made.stdout)
        assert endpoint["events"] == ["account.created"]
        receiver.secret = endpoint["secret"]
        endpoint_id = endpoint["id"]
        listed = json.loads(cli(env, "webhook-endpoints", "list").stdout)
        assert [e["id"] for e in listed] == [endpoint_id]
        assert "secret" not in listed[0]

        await api.post("/v1/billing/accounts", identity("cli-hook@example.com"))
        delivered = cli(env, "webhook-endpoints", "deliver")
        assert delivered.returncode == 0, delivered.stderr
        assert json.loads(delivered.stdout) == {"dispatched": 1, "delivered": 1, "failed": 0}
        assert len(receiver.received) == 1

        (delivery,) = json.loads(cli(env, "webhook-endpoints", "deliveries", endpoint_id).stdout)
        assert delivery["status"] == "delivered"
        resent = cli(env, "webhook-endpoints", "resend", endpoint_id, delivery["id"])
        assert json.loads(resent.stdout)["status"] == "pending"
        cli(env, "webhook-endpoints", "deliver")
        assert receiver.ids() == [delivery["event_id"]] * 2  # a resend: the same webhook-id

        rotated = json.loads(cli(env, "webhook-endpoints", "rotate-secret", endpoint_id).stdout)
        assert rotated["secret"] != endpoint["secret"]
        assert (
            json.loads(cli(env, "webhook-endpoints", "disable", endpoint_id).stdout)["status"]
            == "disabled"
        )
        assert (
            json.loads(cli(env, "webhook-endpoints", "enable", endpoint_id).stdout)["status"]
            == "enabled"
        )
        shown = json.loads(cli(env, "webhook-endpoints", "show", endpoint_id).stdout)
        assert shown["previous_secret_expires_at"] is not None
        assert cli(env, "webhook-endpoints", "delete", endpoint_id).returncode == 0
        missing = cli(env, "webhook-endpoints", "show", endpoint_id)
        assert missing.returncode == 1
        assert "webhook_endpoint_not_found" in missing.stderr

    threshold = cli(env, "low-balance-threshold", "oauth:google", "cli-hook@example.com", "7")
    assert json.loads(threshold.stdout)["threshold_in_force"] == 7
    back = cli(env, "low-balance-threshold", "oauth:google", "cli-hook@example.com", "default")
    # The default on the free plan is no alert before a first purchase (issue 21 finding 15).
    assert json.loads(back.stdout)["threshold_in_force"] == 0
