"""Reservations (holds): reserve before, capture after (SPEC.md "Reservations (holds)").

Request in, response out, and the ledger invariant (`await api.audit()`) after each test.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
from prometheus_client import REGISTRY

from ciris_billing import job_recovery
from ciris_billing.accounts import reservation_answers, reservation_routes, reservations
from ciris_billing.accounts.reservation_answers import capture_body as capture_answer
from ciris_billing.db import reservations as reservations_table
from ciris_billing.db import utcnow
from ciris_billing.jobs import Recovery, RecoveryReport
from ciris_billing.unit_of_work import unit_of_work
from tests.support.api import Api, identity, make_settings, running_app

RESERVE = "/v1/billing/reservations"
CHECK = "/v1/billing/credits/check"
CHARGE = "/v1/billing/charges"


def user(name: str) -> dict[str, str]:
    return identity(f"{name}@example.com")


async def reserve(api: Api, who: dict[str, str], uses: int = 1, **extra: Any) -> Any:
    return await api.post(RESERVE, {**who, "uses": uses, **extra})


async def clean(api: Api) -> None:
    report = await api.audit()
    assert report.clean, report


async def test_reserve_then_capture_part_charges_once_and_releases_the_rest(api: Api) -> None:
    who = user("partial")
    held = await reserve(api, who, uses=2, metadata={"task": "summarize"})
    assert held.status_code == 201, held.text
    hold = held.json()
    assert hold["status"] == "held"
    assert hold["uses"] == 2
    assert hold["held_uses"] == 2
    assert hold["free_uses_remaining"] == 1  # 3 free uses, 2 held
    check = (await api.post(CHECK, who, scope="read")).json()
    assert check["held_uses"] == 2
    assert check["free_uses_remaining"] == 1
    assert check["has_credit"] is True

    captured = await api.post(
        f"{RESERVE}/{hold['reservation_id']}/capture", {"uses": 1, "description": "Chat"}
    )
    assert captured.status_code == 201, captured.text
    charge = captured.json()
    assert charge["reservation_id"] == hold["reservation_id"]
    assert charge["charge_id"].startswith("ch_")
    assert (charge["uses"], charge["free_uses_used"], charge["paid_uses_used"]) == (1, 1, 0)
    assert charge["released_uses"] == 1
    assert charge["held_uses"] == 0
    assert charge["free_uses_remaining"] == 2
    assert charge["total_uses"] == 1
    assert charge["metadata"] == {"task": "summarize"}

    shown = (await api.get(f"{RESERVE}/{hold['reservation_id']}")).json()
    assert shown["status"] == "captured"
    assert shown["captured_uses"] == 1
    assert shown["charge_id"] == charge["charge_id"]
    ledger = (await api.get("/v1/billing/transactions", **who)).json()
    assert [t["transaction_id"] for t in ledger["transactions"] if t["type"] == "charge"] == [
        charge["charge_id"]
    ]
    await clean(api)


async def test_free_uses_are_held_before_paid_ones_and_go_back_where_they_came_from(
    api: Api,
) -> None:
    who = user("split")
    granted = await api.post(
        "/v1/billing/credits", {**who, "uses": 20, "reason": "pack"}, scope="admin"
    )
    assert granted.status_code == 201, granted.text
    hold = (await reserve(api, who, uses=5)).json()
    assert (hold["free_uses_remaining"], hold["credits_remaining"]) == (0, 18)
    released = await api.post(f"{RESERVE}/{hold['reservation_id']}/release", {})
    assert released.status_code == 200
    assert (released.json()["free_uses_remaining"], released.json()["credits_remaining"]) == (
        3,
        20,
    )
    hold = (await reserve(api, who, uses=5)).json()
    charge = (await api.post(f"{RESERVE}/{hold['reservation_id']}/capture", {})).json()
    assert (charge["free_uses_used"], charge["paid_uses_used"]) == (3, 2)
    assert (charge["free_uses_remaining"], charge["credits_remaining"]) == (0, 18)
    await clean(api)


async def test_release_gives_every_use_back_and_is_idempotent(api: Api) -> None:
    who = user("release")
    hold = (await reserve(api, who, uses=3)).json()
    first = await api.post(f"{RESERVE}/{hold['reservation_id']}/release", {})
    again = await api.post(f"{RESERVE}/{hold['reservation_id']}/release", {})
    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == again.json()["status"] == "released"
    assert again.json()["free_uses_remaining"] == 3
    assert again.json()["held_uses"] == 0
    late = await api.post(f"{RESERVE}/{hold['reservation_id']}/capture", {})
    assert late.status_code == 409
    assert late.json()["error"] == "reservation_not_held"
    await clean(api)


async def test_capture_retried_with_its_key_replays_and_another_capture_is_409(api: Api) -> None:
    who = user("replay")
    hold = (await reserve(api, who, uses=2)).json()
    path = f"{RESERVE}/{hold['reservation_id']}/capture"
    first = await api.post(path, {"uses": 2}, **{"Idempotency-Key": "cap-1"})
    again = await api.post(path, {"uses": 2}, **{"Idempotency-Key": "cap-1"})
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    other = await api.post(path, {"uses": 2}, **{"Idempotency-Key": "cap-2"})
    assert other.status_code == 409
    assert other.json()["error"] == "reservation_not_held"
    assert (await api.post(path, {"uses": 1}, **{"Idempotency-Key": "cap-1"})).status_code == 409
    check = (await api.post(CHECK, who, scope="read")).json()
    assert check["total_uses"] == 2
    await clean(api)


async def test_reserve_retried_with_its_key_holds_once(api: Api) -> None:
    who = user("hold-once")
    answers = await asyncio.gather(
        *(api.post(RESERVE, {**who, "uses": 1}, **{"Idempotency-Key": "h-1"}) for _ in range(5))
    )
    assert {r.status_code for r in answers} == {201}
    assert len({r.json()["reservation_id"] for r in answers}) == 1
    assert (await api.post(CHECK, who, scope="read")).json()["held_uses"] == 1
    await clean(api)


async def test_not_enough_available_uses_is_402_with_the_offer(api: Api) -> None:
    who = user("short")
    refused = await reserve(api, who, uses=4)
    assert refused.status_code == 402
    body = refused.json()
    assert body["error"] == "purchase_required"
    assert body["purchase_required"] is True
    assert body["checkout_url"].startswith("http://billing.test/")
    assert body["purchase_uses"] == 20
    # The unknown identity was created as a check would, with its free uses.
    check = (await api.post(CHECK, who, scope="read")).json()
    assert (check["free_uses_remaining"], check["held_uses"]) == (3, 0)
    await clean(api)


async def test_a_charge_never_spends_reserved_uses(api: Api) -> None:
    who = user("charge-held")
    hold = (await reserve(api, who, uses=3)).json()
    charged = await api.post(CHARGE, {**who, "uses": 1})
    assert charged.status_code == 402
    check = (await api.post(CHECK, who, scope="read")).json()
    assert check["has_credit"] is False
    assert check["held_uses"] == 3
    # A hold is a promise: capturing it still succeeds.
    captured = await api.post(f"{RESERVE}/{hold['reservation_id']}/capture", {})
    assert captured.status_code == 201
    assert captured.json()["uses"] == 3
    await clean(api)


async def test_capturing_more_than_held_is_422(api: Api) -> None:
    hold = (await reserve(api, user("more"), uses=1)).json()
    more = await api.post(f"{RESERVE}/{hold['reservation_id']}/capture", {"uses": 2})
    assert more.status_code == 422
    await clean(api)


async def test_suspension_refuses_new_holds_not_captures(api: Api) -> None:
    who = user("suspended")
    hold = (await reserve(api, who, uses=1)).json()
    path = f"/v1/billing/accounts/{who['oauth_provider']}/{who['external_id']}/suspend"
    assert (await api.post(path, {"reason": "review"}, scope="admin")).status_code == 200
    refused = await reserve(api, who, uses=1)
    assert refused.status_code == 403
    assert refused.json()["error"] == "account_suspended"
    captured = await api.post(f"{RESERVE}/{hold['reservation_id']}/capture", {})
    assert captured.status_code == 201
    await clean(api)


async def test_scopes_write_to_hold_read_to_look(api: Api) -> None:
    who = user("scopes")
    assert (await api.post(RESERVE, {**who, "uses": 1}, scope="read")).status_code == 403
    hold = (await reserve(api, who)).json()
    rid = hold["reservation_id"]
    assert (await api.post(f"{RESERVE}/{rid}/capture", {}, scope="read")).status_code == 403
    assert (await api.post(f"{RESERVE}/{rid}/release", {}, scope="read")).status_code == 403
    assert (await api.get(f"{RESERVE}/{rid}")).status_code == 200
    assert (await api.get(f"{RESERVE}/rsv_unknown")).status_code == 404
    await clean(api)


async def test_list_filters_by_identity_and_status(api: Api) -> None:
    a, b = user("list-a"), user("list-b")
    first = (await reserve(api, a)).json()
    await reserve(api, a)
    await reserve(api, b)
    await api.post(f"{RESERVE}/{first['reservation_id']}/release", {})
    mine = (await api.get(RESERVE, **a)).json()["reservations"]
    assert len(mine) == 2
    held = (await api.get(RESERVE, **a, status="held")).json()["reservations"]
    assert [r["status"] for r in held] == ["held"]
    assert len((await api.get(RESERVE, status="held")).json()["reservations"]) == 2
    assert (await api.get(RESERVE, oauth_provider="oauth:google")).status_code == 422
    await clean(api)


async def test_capture_after_expires_at_is_409_whatever_the_job(api: Api) -> None:
    who = user("late")
    hold = (await reserve(api, who, uses=2, ttl_seconds=1)).json()
    await asyncio.sleep(1.2)
    # No job runs in this app: the hold is still 'held' in the table, and refused by the clock.
    late = await api.post(f"{RESERVE}/{hold['reservation_id']}/capture", {})
    assert late.status_code == 409
    assert late.json()["error"] == "reservation_expired"
    await clean(api)


async def test_a_hold_past_its_ttl_is_released_by_the_job_queue(database_url: str) -> None:
    """A client killed mid-interaction: its hold comes back by itself within seconds."""
    settings = make_settings(
        database_url,
        jobs_enabled=True,
        jobs_poll_seconds=1,
        allowed_hosts=["billing.test"],
    )
    async with running_app(settings) as api:
        who = user("killed")
        hold = (await reserve(api, who, uses=3, ttl_seconds=1)).json()
        assert hold["free_uses_remaining"] == 0
        deadline = time.monotonic() + 15
        status = "held"
        while time.monotonic() < deadline:
            status = (await api.get(f"{RESERVE}/{hold['reservation_id']}")).json()["status"]
            if status == "expired":
                break
            await asyncio.sleep(0.3)
        assert status == "expired"
        check = (await api.post(CHECK, who, scope="read")).json()
        assert (check["free_uses_remaining"], check["held_uses"]) == (3, 0)
        late = await api.post(f"{RESERVE}/{hold['reservation_id']}/capture", {})
        assert late.status_code == 409
        assert late.json()["error"] == "reservation_expired"
        released = await api.post(f"{RESERVE}/{hold['reservation_id']}/release", {})
        assert released.status_code == 200
        assert released.json()["status"] == "expired"
        await clean(api)


async def test_concurrent_holds_never_over_commit(api: Api) -> None:
    who = user("storm")
    await api.post("/v1/billing/credits", {**who, "uses": 20, "reason": "pack"}, scope="admin")
    answers = await asyncio.gather(*(reserve(api, who) for _ in range(200)))
    statuses = [r.status_code for r in answers]
    assert statuses.count(201) == 23, statuses
    assert statuses.count(402) == 177
    check = (await api.post(CHECK, who, scope="read")).json()
    assert (check["held_uses"], check["free_uses_remaining"], check["credits_remaining"]) == (
        23,
        0,
        0,
    )
    assert (await api.post(CHARGE, {**who, "uses": 1})).status_code == 402
    await clean(api)


async def test_capture_and_release_racing_exactly_one_wins(api: Api) -> None:
    who = user("race")
    await api.post("/v1/billing/credits", {**who, "uses": 20, "reason": "pack"}, scope="admin")
    holds = [(await reserve(api, who)).json()["reservation_id"] for _ in range(10)]
    for rid in holds:
        captured, released = await asyncio.gather(
            api.post(f"{RESERVE}/{rid}/capture", {}),
            api.post(f"{RESERVE}/{rid}/release", {}),
        )
        outcomes = {captured.status_code, released.status_code}
        assert outcomes in ({201, 409}, {409, 200}), (captured.text, released.text)
    shown = (await api.get(RESERVE, **who)).json()["reservations"]
    captures = sum(1 for r in shown if r["status"] == "captured")
    check = (await api.post(CHECK, who, scope="read")).json()
    assert check["total_uses"] == captures
    assert check["held_uses"] == 0
    assert check["free_uses_remaining"] + check["credits_remaining"] == 23 - captures
    await clean(api)


async def test_one_statement_and_unit_of_work_holds_answer_alike(api: Api) -> None:
    """A hold and its capture are one statement each (hot/holds.py; with an Idempotency-Key in
    a transaction that records the answer); what the statement does not make goes through a
    unit of work (reservations.py), e.g. the first hold of an unknown identity. Same answers,
    same books; the statements were used (the batch-size metric counts them)."""

    def statements(kind: str) -> float:
        return REGISTRY.get_sample_value("billing_batch_size_count", {"statement": kind}) or 0

    volatile = {"reservation_id", "account_id", "external_id", "charge_id"}
    volatile |= {"created_at", "expires_at"}

    def shown(answer: Any) -> Any:
        # The lots a capture drew from: new ids per account, the same uses.
        lots = [lot["uses"] for lot in answer.get("lots", [])]
        return {k: v for k, v in answer.items() if k not in volatile | {"lots"}} | {"lots": lots}

    before = statements("hold"), statements("capture")
    holds, captures = [], []
    capture_body = {"uses": 1, "amount_minor": 7, "description": "d", "metadata": {"b": 2}}
    for name in ("unknown", "known", "keyed"):
        who = user(f"alike-{name}")
        if name != "unknown":
            await api.post(CHECK, who, scope="read")  # the account exists: one statement
        headers = {"Idempotency-Key": f"alike-{name}"} if name == "keyed" else {}
        held = await api.post(RESERVE, {**who, "uses": 2, "metadata": {"a": 1}}, **headers)
        assert held.status_code == 201, held.text
        holds.append(shown(held.json()))
        reservation_id = held.json()["reservation_id"]
        if name == "unknown":  # the unit of work's capture, as the route runs it on a miss
            async with unit_of_work(api.engine) as work:
                wanted = reservations.CaptureRequest(
                    reservation_id, 1, 7, "d", {"b": 2}, api_key_id="k"
                )
                made = await reservations.capture(await work.connection(), wanted)
                captures.append(shown(capture_answer(made.charge, made.account, made.reservation)))
            continue
        headers = {"Idempotency-Key": f"alike-{name}-capture"} if name == "keyed" else {}
        captured = await api.post(f"{RESERVE}/{reservation_id}/capture", capture_body, **headers)
        assert captured.status_code == 201, captured.text
        captures.append(shown(captured.json()))
    assert holds[0] == holds[1] == holds[2]
    assert captures[0] == captures[1] == captures[2]
    assert captures[0]["metadata"] == {"a": 1, "b": 2}
    # Every hold and capture went through the statements (keyed ones too), the unknown
    # identity's hold as a statement that missed, then the unit of work.
    assert (statements("hold"), statements("capture")) == (before[0] + 3, before[1] + 2)
    await clean(api)


async def test_concurrent_retries_of_a_keyed_hold_and_capture_make_one_each(api: Api) -> None:
    """Twins racing on one key: one statement takes the key, the others wait for its commit
    and replay its answer."""
    who = user("twins")
    await api.post(CHECK, who, scope="read")
    holds = await asyncio.gather(
        *(
            api.post(RESERVE, {**who, "uses": 2}, **{"Idempotency-Key": "twin-hold"})
            for _ in range(8)
        )
    )
    assert {h.status_code for h in holds} == {201}
    assert len({h.json()["reservation_id"] for h in holds}) == 1
    assert sum(h.headers.get("Idempotent-Replayed") == "true" for h in holds) == 7
    capture = f"{RESERVE}/{holds[0].json()['reservation_id']}/capture"
    captures = await asyncio.gather(
        *(api.post(capture, {"uses": 1}, **{"Idempotency-Key": "twin-capture"}) for _ in range(8))
    )
    assert {c.status_code for c in captures} == {201}
    assert len({c.json()["charge_id"] for c in captures}) == 1
    check = (await api.post(CHECK, who, scope="read")).json()
    assert (check["free_uses_remaining"], check["held_uses"], check["total_uses"]) == (2, 0, 1)
    await clean(api)


class Events:
    """Stands in for the modules' structlog logger (its loggers are cached on first use, so
    structlog's own capture cannot see them): the events logged, by name."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def _record(self, event: str, **_fields: Any) -> None:
        self.names.append(event)

    info = warning = error = _record


async def test_every_outcome_is_counted_and_logged(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """billing_reservations_total{outcome} and the guide-style log events, once per step."""
    events = Events()
    for module in (reservation_answers, reservation_routes, job_recovery):
        monkeypatch.setattr(module, "log", events)

    def counted(outcome: str) -> float:
        return REGISTRY.get_sample_value("billing_reservations_total", {"outcome": outcome}) or 0

    outcomes = ("held", "captured", "released", "expired", "refused")
    before = {outcome: counted(outcome) for outcome in outcomes}
    who = user("counted")
    await _every_outcome(api, who)
    after = {outcome: counted(outcome) - before[outcome] for outcome in outcomes}
    assert after == {"held": 3, "captured": 1, "released": 1, "expired": 1, "refused": 1}
    for event, times in (("held", 3), ("captured", 1), ("released", 1), ("expired", 1)):
        assert events.names.count(f"reservation_{event}") == times, (event, events.names)
    await clean(api)


async def _every_outcome(api: Api, who: dict[str, str]) -> None:
    """Three 1-use holds on 3 free uses, a fourth refused; one captured, one released (twice),
    one expired by the job."""
    first, second, third = [(await reserve(api, who)).json() for _ in range(3)]
    assert (await reserve(api, who)).status_code == 402
    await api.post(f"{RESERVE}/{first['reservation_id']}/capture", {})
    await api.post(f"{RESERVE}/{second['reservation_id']}/release", {})
    await api.post(f"{RESERVE}/{second['reservation_id']}/release", {})  # again: nothing new
    async with api.engine.begin() as conn:  # its TTL passes
        await conn.execute(
            reservations_table.update()
            .where(reservations_table.c.id == third["reservation_id"])
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
    report = RecoveryReport()
    await Recovery(api.state.settings, api.engine, api.state.provider).expire_holds(report)
    assert report.expired == 1


async def test_a_hold_lasts_at_most_a_day(api: Api) -> None:
    who = user("ttl")
    assert (await reserve(api, who, ttl_seconds=86_401)).status_code == 422
    assert (await reserve(api, who, ttl_seconds=0)).status_code == 422
    held = (await reserve(api, who, ttl_seconds=86_400)).json()
    assert held["status"] == "held"
    await clean(api)
