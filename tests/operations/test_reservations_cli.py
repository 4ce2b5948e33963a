"""`ciris-billing reservations list|show|release`: the operator's view of holds."""

from __future__ import annotations

import json
import os

from tests.support.api import Api, identity
from tests.support.cli import cli


async def test_reservations_list_show_release(api: Api) -> None:
    env = {**os.environ, "DATABASE_URL": api.database_url}
    who = identity("cli-hold@example.com")
    hold = (await api.post("/v1/billing/reservations", {**who, "uses": 2})).json()
    rid = hold["reservation_id"]

    listed = cli(env, "reservations", "list", "oauth:google/cli-hold@example.com")
    assert listed.returncode == 0, listed.stderr
    assert rid in listed.stdout
    assert "held" in listed.stdout

    shown = cli(env, "reservations", "show", rid)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["free_uses_held"] == 2

    released = cli(env, "reservations", "release", rid)
    assert released.returncode == 0, released.stderr
    assert f"{rid}: released" in released.stdout
    check = (await api.post("/v1/billing/credits/check", who, scope="read")).json()
    assert (check["free_uses_remaining"], check["held_uses"]) == (3, 0)

    assert cli(env, "reservations", "show", "rsv_missing").returncode == 1
    assert cli(env, "reservations", "list", "--status", "held").stdout == ""
    report = await api.audit()
    assert report.clean, report
