"""Finding 5 of issue 12, "Erasure".

The attack: erase an identity, use it again, erase again -> 500 (unique violation on the
digest); the returning identity got 3 fresh free uses (free-tier abuse by erase-and-return);
erasure deleted stored idempotent responses, so an old grant retried with its key was applied
again; the digest was an unsalted SHA-256 of provider and email (reversible from a list of
emails). Now erasure is repeatable and idempotent, the digest is keyed (HMAC with the
installation's erasure key), a returning identity gets an account without free uses, and
idempotency records keep their key and fingerprint (only personal data leaves their bodies).
"""

from __future__ import annotations

import hashlib

from sqlalchemy import select, text

from ciris_billing.db import accounts, credits, idempotency_keys
from tests.support.api import Api, identity

EMAIL = "erase-and-return@example.com"
USER = identity(EMAIL)
ACCOUNT = f"/v1/billing/accounts/oauth:google/{EMAIL}"


async def erase(api: Api) -> dict[str, object]:
    erased = await api.http.delete(ACCOUNT, headers=api.headers("admin"))
    assert erased.status_code == 200, erased.text
    body: dict[str, object] = erased.json()
    return body


async def check(api: Api) -> dict[str, object]:
    answer = await api.post("/v1/billing/credits/check", USER)
    assert answer.status_code == 200, answer.text
    body: dict[str, object] = answer.json()
    return body


async def test_finding05_erase_return_erase_again_and_no_new_free_uses(api: Api) -> None:
    assert (await api.post("/v1/billing/charges", USER)).status_code == 201
    first = await erase(api)
    assert (await erase(api))["account_id"] == first["account_id"], "erasing twice: the same"

    # The identity comes back: a new account, without new free uses.
    again = await check(api)
    assert (again["free_uses_remaining"], again["has_credit"]) == (0, False)
    assert (await api.post("/v1/billing/charges", USER)).status_code == 402
    second = await erase(api)  # was a 500 (unique violation on the digest)
    assert second["account_id"] != first["account_id"]
    assert (await erase(api))["account_id"] == second["account_id"]

    # Back a third time: still no free uses, and the export is the newest account's.
    assert (await check(api))["free_uses_remaining"] == 0
    exported = await api.http.get(f"{ACCOUNT}/export", headers=api.headers("admin"))
    assert exported.status_code == 200
    third = exported.json()["account"]
    assert third["id"] not in (first["account_id"], second["account_id"])
    assert third["erased_at"] is None
    assert third["free_uses_remaining"] == 0
    async with api.engine.connect() as conn:
        free_grants = (
            await conn.execute(select(credits.c.account_id).where(credits.c.kind == "free_grant"))
        ).all()
    assert [row.account_id for row in free_grants] == [first["account_id"]]
    assert (await api.audit()).clean


async def test_finding05_the_digest_is_keyed(api: Api) -> None:
    await check(api)
    await erase(api)
    unsalted = hashlib.sha256(f"oauth:google\0{EMAIL}".encode()).hexdigest()
    async with api.engine.connect() as conn:
        dump = "\n".join(str(row) for row in await conn.execute(text("SELECT * FROM accounts")))
    assert unsalted not in dump
    assert EMAIL not in dump
    # Still found by whoever knows the identity (export), through the keyed digest.
    exported = await api.http.get(f"{ACCOUNT}/export", headers=api.headers("admin"))
    assert exported.status_code == 200
    assert exported.json()["account"]["erased_at"] is not None


async def test_finding05_a_retried_grant_after_erasure_is_not_applied_twice(api: Api) -> None:
    body = {**USER, "uses": 10, "reason": f"Goodwill for {EMAIL}"}
    granted = await api.post(
        "/v1/billing/credits", body, scope="admin", **{"Idempotency-Key": "g-erase"}
    )
    assert granted.status_code == 201, granted.text
    await erase(api)
    retried = await api.post(
        "/v1/billing/credits", body, scope="admin", **{"Idempotency-Key": "g-erase"}
    )
    assert retried.status_code == 201, retried.text
    assert retried.headers.get("Idempotent-Replayed") == "true"
    assert EMAIL not in retried.text
    other = await api.post(
        "/v1/billing/credits", {**body, "uses": 11}, scope="admin", **{"Idempotency-Key": "g-erase"}
    )
    assert other.status_code == 409
    async with api.engine.connect() as conn:
        grants = (await conn.execute(select(credits).where(credits.c.kind == "grant"))).all()
        stored = (await conn.execute(select(idempotency_keys))).all()
        live = (await conn.execute(select(accounts).where(accounts.c.erased_at.is_(None)))).all()
    assert len(grants) == 1, "applied once"
    assert live == [], "the retry made no new account"
    assert len(stored) == 1
    assert EMAIL not in stored[0].response_body
    assert (await api.audit()).clean
