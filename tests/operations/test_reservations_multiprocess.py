"""Reservations across two real server processes (issue 13, Correctness): 1,000 concurrent
1-use holds on an account with 23 uses through `ciris-billing serve --workers 2` hold exactly 23
and refuse 977 (402); charges are refused while every use is held; then captures, releases and
new holds race: never over-committed, every transition once, `ciris-billing audit` clean."""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from ciris_billing.db import charges, create_engine, reservations
from tests.support.cli import cli, create_key
from tests.support.servers import running_service, service_env

pytestmark = pytest.mark.slow  # real service processes (2 workers), ~1,300 requests

USER = {"oauth_provider": "oauth:google", "external_id": "holds-mp@example.com"}
RESERVE = "/v1/billing/reservations"
USES = 23  # 3 free + 20 paid (an initial balance of 20)


def committed(body: dict[str, Any]) -> int:
    """Everything the account's answer accounts for: available + held + spent."""
    return int(
        body["free_uses_remaining"]
        + body["credits_remaining"]
        + body["held_uses"]
        + body["total_uses"]
    )


async def test_1000_holds_on_23_uses_through_two_workers_then_racing_transitions(
    fresh_database: str, tmp_path: Path
) -> None:
    # The floods are the point here, not the rate limits (tests/accounts/test_limits.py).
    env = service_env(
        fresh_database, RATE_LIMIT_KEY_PER_SECOND="0", RATE_LIMIT_ACCOUNT_PER_MINUTE="0"
    )
    key = create_key(env, "admin")  # a paid initial balance: admin
    log_path = tmp_path / "server.log"
    with running_service(env, log_path, workers=2) as base:
        async with (
            httpx.AsyncClient(
                base_url=base,
                headers={"X-API-Key": key},
                limits=httpx.Limits(max_connections=100),
                timeout=60,
            ) as http,
            asyncio.timeout(240),
        ):
            created = await http.post(
                "/v1/billing/accounts", json={**USER, "initial_balance_minor": 20}
            )
            assert created.status_code == 201, created.text

            # 1,000 holds at once: exactly 23 held, 977 refused with the charge's 402.
            answers = await asyncio.gather(
                *(http.post(RESERVE, json={**USER, "uses": 1}) for _ in range(1000))
            )
            statuses = [r.status_code for r in answers]
            assert statuses.count(201) == USES, sorted(set(statuses))
            assert statuses.count(402) == 1000 - USES, sorted(set(statuses))
            refused = next(r.json() for r in answers if r.status_code == 402)
            assert refused["error"] == "purchase_required"
            held = [r.json() for r in answers if r.status_code == 201]
            assert all(committed(body) == USES for body in held)
            holds = [body["reservation_id"] for body in held]
            assert len(set(holds)) == USES

            # Every use is held: a charge is refused, the check says so.
            assert (await http.post("/v1/billing/charges", json=USER)).status_code == 402
            check = (await http.post("/v1/billing/credits/check", json=USER)).json()
            assert (check["has_credit"], check["held_uses"]) == (False, USES)

            # Racing: each hold captured twice under one key and released twice, while 200
            # new holds try to take whatever a release gives back.
            async def capture(rid: str) -> httpx.Response:
                return await http.post(
                    f"{RESERVE}/{rid}/capture",
                    json={"description": "interaction"},
                    headers={"Idempotency-Key": f"cap-{rid}"},
                )

            async def release(rid: str) -> httpx.Response:
                return await http.post(f"{RESERVE}/{rid}/release", json={})

            racing = [
                *(capture(rid) for rid in holds for _ in range(2)),
                *(release(rid) for rid in holds for _ in range(2)),
                *(http.post(RESERVE, json={**USER, "uses": 1}) for _ in range(200)),
            ]
            # Sent in a shuffled order (seeded), so captures and releases each win some races.
            order = list(range(len(racing)))
            random.Random(13).shuffle(order)
            sent = [asyncio.ensure_future(racing[i]) for i in order]
            await asyncio.gather(*sent)
            raced = [sent[order.index(i)].result() for i in range(len(racing))]
            captures, releases, late = (
                raced[: 2 * USES],
                raced[2 * USES : 4 * USES],
                raced[4 * USES :],
            )
            captured: set[str] = set()
            for index, rid in enumerate(holds):
                pair = captures[2 * index : 2 * index + 2]
                undone = releases[2 * index : 2 * index + 2]
                if {r.status_code for r in pair} == {201}:
                    # Captured once; the retry under its key replays the same charge.
                    assert pair[0].json()["charge_id"] == pair[1].json()["charge_id"]
                    assert {r.status_code for r in undone} == {409}, [r.text for r in undone]
                    captured.add(rid)
                else:
                    assert {r.status_code for r in pair} == {409}, [r.text for r in pair]
                    assert {r.status_code for r in undone} == {200}, [r.text for r in undone]
                    assert {r.json()["status"] for r in undone} == {"released"}
                for answer in [*pair, *undone]:
                    if answer.status_code in (200, 201):
                        assert committed(answer.json()) == USES, answer.text
            late_held = [r.json() for r in late if r.status_code == 201]
            assert {r.status_code for r in late} <= {201, 402}
            assert all(committed(body) == USES for body in late_held)
            # Never over-committed: what was captured and newly held fits in the 23 uses.
            assert len(captured) + len(late_held) <= USES

            # The late holds released, all at once (each once, the second an idempotent 200).
            closing = await asyncio.gather(
                *(release(body["reservation_id"]) for body in late_held for _ in range(2))
            )
            assert {r.status_code for r in closing} <= {200}
            final = (await http.post("/v1/billing/credits/check", json=USER)).json()
            assert final["held_uses"] == 0
            assert final["total_uses"] == len(captured)
            assert final["free_uses_remaining"] + final["credits_remaining"] == USES - len(captured)

    # Two workers served; the database agrees: one charge per captured hold, none other.
    worker_pids = set(re.findall(r"Started server process \[(\d+)\]", log_path.read_text()))
    assert len(worker_pids) >= 2, log_path.read_text()
    engine = create_engine(fresh_database)
    try:
        async with engine.connect() as conn:
            by_status: dict[str, int] = {
                row[0]: int(row[1])
                for row in await conn.execute(
                    select(reservations.c.status, func.count()).group_by(reservations.c.status)
                )
            }
            charged = {
                row.reservation_id
                for row in await conn.execute(
                    select(charges.c.reservation_id).where(charges.c.reservation_id.is_not(None))
                )
            }
    finally:
        await engine.dispose()
    assert charged == captured
    print(
        f"raced: {len(captured)} captured, {USES - len(captured)} released, "
        f"{len(late_held)} of 200 late holds took released uses"
    )
    expected = {"captured": len(captured), "released": USES - len(captured) + len(late_held)}
    assert by_status == {status: count for status, count in expected.items() if count}
    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "clean" in audited.stdout, audited.stdout
