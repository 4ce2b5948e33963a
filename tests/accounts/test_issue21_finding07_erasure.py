"""Issue 21, finding 7: "Erasure leaves personal data behind".

The attack: hold uses with the email in the reservation's metadata, erase the account: the hold
still showed the email, a later capture copied it into a charge, `reservation.expired` sent it
to endpoints, export left reservations out; the saved card stayed attached at the provider.
Now erasure scrubs every table (reservations, the audit trail, the stored provider events,
credits' texts) and every outgoing event still queued; it detaches the card at the provider,
and when the provider is down the recovery job detaches it later; export lists reservations.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import create_async_engine

from ciris_billing.db import auto_topup_settings, sandbox_payment_methods
from ciris_billing.jobs import Recovery
from ciris_billing.payments.providers.sandbox import SandboxProvider
from tests.autotopup.test_auto_topup import buy_saving_card, settings_row
from tests.support.api import Api, identity


def _user() -> str:
    return f"erase-all-{uuid.uuid4().hex[:8]}@example.com"


async def _erase(api: Api, email: str) -> None:
    erased = await api.http.delete(
        f"/v1/billing/accounts/oauth:google/{email}", headers=api.headers("admin")
    )
    assert erased.status_code == 200, erased.text


async def _hold(api: Api, email: str, ttl: int = 300) -> dict[str, Any]:
    held = await api.post(
        "/v1/billing/reservations",
        {**identity(email), "uses": 1, "ttl_seconds": ttl, "metadata": {"user": email}},
    )
    assert held.status_code == 201, held.text
    body: dict[str, Any] = held.json()
    return body


async def _everything(api: Api) -> str:
    """Every row of every table of the service, as text."""
    async with api.engine.connect() as conn:
        names = (
            await conn.execute(
                text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                    "AND tablename NOT LIKE 'procrastinate%'"
                )
            )
        ).scalars()
        dump: list[str] = []
        for name in list(names):
            rows = await conn.execute(text(f'SELECT * FROM "{name}"'))  # noqa: S608
            dump.extend(f"{name}: {row}" for row in rows)
    return "\n".join(dump)


async def test_issue21_finding07_erasure_scrubs_holds_captures_and_queued_events(
    api: Api,
) -> None:
    email = _user()
    await buy_saving_card(api, email)
    grant = await api.post(
        "/v1/billing/credits",
        {**identity(email), "uses": 2, "reason": f"Goodwill for {email}"},
        scope="admin",
    )
    assert grant.status_code == 201, grant.text
    kept = await _hold(api, email)
    expiring = await _hold(api, email, ttl=1)

    await _erase(api, email)

    shown = await api.get(f"/v1/billing/reservations/{kept['reservation_id']}")
    assert shown.status_code == 200, shown.text
    assert email not in shown.text, "the hold still showed the email"
    captured = await api.post(f"/v1/billing/reservations/{kept['reservation_id']}/capture", {})
    assert captured.status_code == 201, captured.text
    assert email not in captured.text, "a capture copied the metadata into a charge"

    async with api.engine.begin() as conn:  # the second hold's deadline passes
        await conn.execute(
            text("UPDATE reservations SET expires_at = now() - interval '1 s' WHERE id = :r"),
            {"r": expiring["reservation_id"]},
        )
    report = await Recovery(api.settings, api.engine, api.state.provider).run_once()
    assert report.expired == 1

    dump = await _everything(api)
    assert email not in dump, [line for line in dump.splitlines() if email in line]
    assert email.split("@")[0] not in dump
    assert (await api.audit()).clean


async def test_issue21_finding07_export_lists_reservations(api: Api) -> None:
    email = _user()
    held = await _hold(api, email)
    exported = await api.http.get(
        f"/v1/billing/accounts/oauth:google/{email}/export", headers=api.headers("admin")
    )
    assert exported.status_code == 200, exported.text
    rows = exported.json()["reservations"]
    assert [(row["id"], row["metadata"]) for row in rows] == [
        (held["reservation_id"], {"user": email})
    ]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_issue21_finding07_erasure_detaches_the_card_even_when_the_provider_was_down(
    api: Api,
) -> None:
    email = _user()
    await buy_saving_card(api, email)
    card = await settings_row(api, email)
    assert card.payment_method_id

    # The provider is unreachable when the account is erased, and at the job's first run.
    # (The sandbox keeps its state in a database: this one's is unreachable.)
    away = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/x")
    down = SandboxProvider(away, "whsec_down", None)
    api.state.provider, sandbox = down, api.state.provider
    try:
        await _erase(api, email)
        first = await Recovery(api.settings, api.engine, down).run_once()
    finally:
        api.state.provider = sandbox
        await away.dispose()
    assert first.failures >= 1
    async with api.engine.connect() as conn:
        attached = await conn.scalar(
            select(sandbox_payment_methods.c.attached_at).where(
                sandbox_payment_methods.c.id == card.payment_method_id
            )
        )
    assert attached is not None, "still attached: the provider was down"

    # Back up: the next run detaches it, and we forget it.
    await Recovery(api.settings, api.engine, sandbox).run_once()
    async with api.engine.connect() as conn:
        attached = await conn.scalar(
            select(sandbox_payment_methods.c.attached_at).where(
                sandbox_payment_methods.c.id == card.payment_method_id
            )
        )
        row = (
            await conn.execute(
                select(auto_topup_settings).where(
                    auto_topup_settings.c.account_id == card.account_id
                )
            )
        ).one()
    assert attached is None, "the card is detached at the provider"
    assert (row.enabled, row.payment_method_id, row.card_last4) == (False, None, None)
