"""Issue 25 item 5: the portal's receipt as a PDF (fpdf2), read back as text with pypdf: the
seller from SELLER_NAME and SELLER_ADDRESS, the pack, amount, discount, card brand and last 4,
and each refund; another account's receipt is a 404 as on the HTML page."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
from pypdf import PdfReader

from ciris_billing import clock
from tests.reports.support import buy, refund, who
from tests.support.api import Api, make_settings, running_app
from tests.support.flows import check


@pytest.fixture
async def seller(database_url: str) -> AsyncIterator[Api]:
    settings = make_settings(
        database_url,
        price_per_purchase_minor=1000,
        paid_uses_per_purchase=3,
        seller_name="Ciris Labs Ltd",
        seller_address="1 Ledger Lane | 10115 Berlin | Germany",
        allowed_hosts=["billing.test"],
    )
    async with running_app(settings) as api:
        try:
            yield api
        finally:
            clock.set_offset(0)


async def portal_link(api: Api, user: dict[str, str]) -> str:
    url: str = (await check(api, user))["portal_url"]
    return url.removeprefix("http://billing.test")


async def test_the_receipt_downloads_as_a_pdf_with_its_facts(seller: Api) -> None:
    api = seller
    user = who("pdf")
    bought = await buy(api, user)
    await refund(api, bought, 250)
    link = await portal_link(api, user)
    page = await api.http.get(f"{link}/receipts/{bought['payment_id']}")
    assert page.status_code == 200
    assert f"receipts/{bought['payment_id']}/pdf" in page.text
    answer = await api.http.get(f"{link}/receipts/{bought['payment_id']}/pdf")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/pdf"
    assert answer.headers["content-disposition"].startswith("attachment;")
    text = PdfReader(io.BytesIO(answer.content)).pages[0].extract_text()
    lines = [line.strip() for line in text.splitlines()]
    assert lines[:4] == ["Ciris Labs Ltd", "1 Ledger Lane", "10115 Berlin", "Germany"]
    for expected in (
        f"Receipt number {bought['payment_id']}",
        "Pack 3 uses",
        "Price $10.00",
        "Discount none",
        "Amount paid $10.00",
        "Card Visa ending in 4242",
        "Net paid $7.50",
    ):
        assert expected in lines, (expected, lines)
    assert next(line for line in lines if line.startswith("Refund ")).endswith("-$2.50")
    # Another account's link does not open this receipt.
    other = await portal_link(api, who("pdf-other"))
    refused = await api.http.get(f"{other}/receipts/{bought['payment_id']}/pdf")
    assert refused.status_code == 404
    assert (await api.audit()).clean
