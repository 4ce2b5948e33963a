"""Issue 21, finding 15: the console's search and the CLI find an account by email, display
name, `acct_` id, `pi_` payment id, identity; any part of them, whatever the case (the
console matched only whole values; the CLI had no search)."""

from __future__ import annotations

import os

import pytest

from tests.support.api import Api, identity
from tests.support.cli import cli
from tests.support.console import Console
from tests.support.flows import purchase

WHO = identity("Ada.Lovelace@Example.com")


@pytest.fixture
async def console(api: Api) -> Console:
    signed_in = await Console(api.http).sign_in(api.keys["admin"])
    assert signed_in.status_code == 303, signed_in.text
    return Console(api.http)


async def _account(api: Api) -> tuple[str, str]:
    made = await api.post(
        "/v1/billing/accounts",
        {**WHO, "customer_email": "ada@analytical.example", "display_name": "Countess Ada"},
        scope="admin",
    )
    assert made.status_code == 201, made.text
    bought = await purchase(api, WHO)
    return made.json()["account_id"], bought["payment_id"]


def _queries(account_id: str, payment_id: str) -> list[str]:
    return [
        "ada@analytical.example",  # the email, whole
        "ANALYTICAL",  # part of it, another case
        "countess",  # part of the display name
        "lovelace@",  # part of the external id
        account_id,  # acct_...
        account_id[:12].upper(),  # its start, another case
        payment_id,  # pi_...
        payment_id[-10:],  # its end
        "oauth:google/ada.lovelace",  # provider/part of the external id
    ]


async def test_finding15_console_search_finds_by_any_part_any_case(
    api: Api, console: Console
) -> None:
    account_id, payment_id = await _account(api)

    for query in _queries(account_id, payment_id):
        page = await console.http.get("/console/accounts", params={"q": query})
        # One account found: its page (a redirect to it).
        assert page.status_code == 303, page.text
        assert page.headers["location"] == f"/console/accounts/{account_id}", query
    nothing = await console.http.get("/console/accounts", params={"q": "%"})
    assert account_id not in nothing.text, "% is a character, not a wildcard"


async def test_finding15_cli_accounts_search_finds_by_any_part_any_case(api: Api) -> None:
    account_id, payment_id = await _account(api)
    env = {**os.environ, "DATABASE_URL": api.database_url}

    for query in _queries(account_id, payment_id):
        found = cli(env, "accounts", "search", query, "--json")
        assert found.returncode == 0, found.stderr
        assert account_id in found.stdout, query
    none = cli(env, "accounts", "search", "a%e", "--json")
    assert account_id not in none.stdout, "% is a character, not a wildcard"
