"""Issue 25 item 4: the console overview's charts (server-side SVG with accessible titles, no
script) and the reports page's tables and CSV links, over the in-process app."""

from __future__ import annotations

import csv
import io
import re
import xml.etree.ElementTree as ET

from ciris_billing import clock
from tests.reports.support import buy, charge, shop, who
from tests.support.api import Api
from tests.support.console import Console

__all__ = ["shop"]

SVG = re.compile(r"<svg id=\"chart-[a-z]+\".*?</svg>", re.S)
NS = "{http://www.w3.org/2000/svg}"


async def test_the_overview_draws_svg_charts_and_the_reports_page_links_csv(shop: Api) -> None:
    api = shop
    user = who("console")
    await buy(api, user)
    await charge(api, user, 3)  # the free use and two paid (666 of 1000)
    console = Console(api.http)
    assert (await console.sign_in(api.keys["admin"])).status_code == 303

    overview = await api.http.get("/console")
    assert overview.status_code == 200
    charts = SVG.findall(overview.text)
    assert len(charts) == 4
    titles = []
    for drawn in charts:
        svg = ET.fromstring(drawn)  # noqa: S314 (our own page) well-formed XML, as SVG must be
        assert svg.get("role") == "img"
        title, desc = svg.find(f"{NS}title"), svg.find(f"{NS}desc")
        assert title is not None
        assert desc is not None
        assert svg.get("aria-labelledby") == f"{title.get('id')} {desc.get('id')}"
        titles.append(title.text)
    assert titles == [
        "Uses per day",
        "Revenue recognized per day (USD)",
        "Deferred revenue (unused paid uses, USD) at the end of each day",
        "New and converting accounts per day",
    ]
    assert "<script" not in "".join(charts)
    assert "style=" not in "".join(charts)  # the CSP allows no inline style
    # Today's bars say what they are, in words.
    today = clock.now().date().isoformat()
    assert f"<title>{today}: recognized 6.66 USD</title>" in overview.text
    assert f"<title>{today}: paid 2</title>" in overview.text
    assert (await api.http.get("/console", params={"days": 90})).text.count("<svg id=") == 4
    assert (await api.http.get("/console", params={"days": 400})).status_code == 422

    reports = await api.http.get("/console/reports")
    assert reports.status_code == 200
    assert 'id="revenue"' in reports.text
    assert 'id="usage"' in reports.text
    link = re.search(r'href="(/console/reports/revenue\.csv\?[^"]+)"', reports.text)
    assert link is not None
    downloaded = await api.http.get(link.group(1).replace("&amp;", "&"))
    assert downloaded.status_code == 200
    rows = list(csv.DictReader(io.StringIO(downloaded.text)))
    assert rows[-1]["period"] == today
    assert int(rows[-1]["recognized_minor"]) == 666
    assert int(rows[-1]["deferred_end_minor"]) == 334
    usage = await api.http.get(f"/console/reports/usage.csv?from={today}&to={today}")
    assert next(csv.DictReader(io.StringIO(usage.text)))["paid_uses"] == "2"
    ledger = await api.http.get(f"/console/exports/ledger.csv?from={today}&to={today}")
    assert ledger.status_code == 200
    assert len(list(csv.DictReader(io.StringIO(ledger.text)))) == 3
    assert (await api.http.get("/console/reports/secrets.csv")).status_code == 404
    assert (await api.http.get("/console/exports/secrets.csv")).status_code == 404
    # Without a session: back to the login form.
    api.http.cookies.clear()
    assert (await api.http.get("/console/reports/revenue.csv")).status_code == 303
    assert (await api.audit()).clean
