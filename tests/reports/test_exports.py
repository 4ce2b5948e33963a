"""Issue 25 item 3: the ledger's and the lots' movements as CSV, from the API and the CLI,
streamed from a server-side cursor in constant memory."""

from __future__ import annotations

import csv
import io
import tracemalloc
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from ciris_billing import clock
from ciris_billing.reports import exports
from tests.reports.support import buy, charge, refund, shop, who
from tests.support.api import Api
from tests.support.cli import cli
from tests.support.servers import service_env

__all__ = ["shop"]


def parsed(body: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(body)))


async def test_ledger_and_lot_movements_as_csv_from_the_api_and_the_cli(shop: Api) -> None:
    api = shop
    a, b = who("export-a"), who("export-b")
    bought = await buy(api, a)
    await charge(api, a, 2)
    await refund(api, bought, 300)
    await charge(api, b, 1)
    today = clock.now().date().isoformat()
    params = {"from": today, "to": today}
    answer = await api.get("/v1/billing/exports/ledger", "admin", **params)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    rows = parsed(answer.text)
    assert [(row["entry"], row["kind"]) for row in rows] == [
        ("credit", "free_grant"),
        ("credit", "purchase"),
        ("charge", "charge"),
        ("credit", "refund"),
        ("credit", "free_grant"),
        ("charge", "charge"),
    ]
    assert [int(row["amount_minor"]) for row in rows if row["entry"] == "credit"] == [
        0,
        1000,
        300,
        0,
    ]
    account_a = rows[0]["account_id"]
    only_a = parsed(
        (await api.get("/v1/billing/exports/ledger", "admin", account_id=account_a, **params)).text
    )
    assert len(only_a) == 4
    assert {row["account_id"] for row in only_a} == {account_a}

    lots = parsed((await api.get("/v1/billing/exports/lots", "admin", **params)).text)
    paid = [row for row in lots if row["lot_kind"] == "paid"]
    # Granted 3, one spent, one taken back by the refund of 300 (a third, rounded up).
    assert [(row["kind"], int(row["uses_delta"])) for row in paid] == [
        ("granted", 3),
        ("charge", -1),
        ("refund", -1),
    ]
    assert {row["cost_basis_minor"] for row in paid} == {"333"}
    assert (await api.get("/v1/billing/exports/ledger", "read", **params)).status_code == 403

    env = service_env(api.database_url)
    printed = cli(env, "export", "ledger", "--from", today, "--to", today)
    assert printed.returncode == 0, printed.stderr
    assert parsed(printed.stdout) == rows
    assert cli(env, "export", "lots", "--from", today, "--to", today).stdout == (
        (await api.get("/v1/billing/exports/lots", "admin", **params)).text
    )
    # The account export keeps its old form.
    kept = cli(env, "export", a["oauth_provider"], a["external_id"])
    assert kept.returncode == 0, kept.stderr
    assert (await api.audit()).clean


ROWS = 200_000


async def test_an_export_streams_in_constant_memory(shop: Api) -> None:
    """200,000 ledger rows (written straight in SQL: the ledger's own paths would take
    minutes) stream out page by page: Python's peak allocation stays a small fraction of the
    CSV's size (the same pages for 1M rows). (No audit: the rows are not the money core's.)"""
    api = shop
    await charge(api, who("many"), 1)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    async with api.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO charges (id, account_id, uses, free_uses_used, paid_uses_used, "
                "amount_minor, currency, metadata, created_at) "
                "SELECT 'ch_bulk_' || n, a.id, 1, 1, 0, 0, 'USD', '{}', "
                "CAST(:at AS timestamptz) + n * interval '1 millisecond' "
                "FROM accounts a, generate_series(1, :rows) AS n"
            ),
            {"at": at, "rows": ROWS},
        )
    size, lines = 0, 0
    tracemalloc.start()
    try:
        async for chunk in exports.stream_csv(api.engine, "ledger", at, at + timedelta(1)):
            size += len(chunk)
            lines += chunk.count("\n")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert lines == ROWS + 1
    assert size > 15_000_000
    # Measured: a peak of 3.3 MB for 21 MB of CSV (a page of rows, the driver's buffers); a
    # buffered export would hold all of it at least once.
    assert peak < min(8_000_000, size / 2), (peak, size)
