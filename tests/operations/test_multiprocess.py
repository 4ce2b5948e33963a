"""The acceptance test: several server processes on one PostgreSQL, real HTTP over loopback."""

from __future__ import annotations

import asyncio
import re
import socket
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.support.cli import cli, create_key
from tests.support.faults import ServiceProcesses
from tests.support.postgres import truncate
from tests.support.servers import running_service, service_env

pytestmark = pytest.mark.slow  # real service processes (2 workers)


async def test_two_workers_100_charges_23_uses(postgres_url: str, tmp_path: Path) -> None:
    await truncate(postgres_url)
    env = service_env(postgres_url)
    key = create_key(env, "admin")  # a paid initial balance: admin
    log_path = tmp_path / "server.log"
    with running_service(env, log_path, workers=2) as base:
        user = {"oauth_provider": "oauth:google", "external_id": "mp@example.com"}
        async with httpx.AsyncClient(
            base_url=base,
            headers={"X-API-Key": key},
            limits=httpx.Limits(max_connections=100),
            timeout=60,
        ) as http:
            created = await http.post(
                "/v1/billing/accounts", json={**user, "initial_balance_minor": 20}
            )
            assert created.status_code == 201
            responses = await asyncio.gather(
                *(http.post("/v1/billing/charges", json=user) for _ in range(100))
            )
            statuses = [r.status_code for r in responses]
            assert statuses.count(201) == 23, statuses
            assert statuses.count(402) == 77, statuses

            new_user = {"oauth_provider": "oauth:google", "external_id": "mp-new@example.com"}
            checks = await asyncio.gather(
                *(http.post("/v1/billing/credits/check", json=new_user) for _ in range(50))
            )
            assert {r.status_code for r in checks} == {200}
            ledger = await http.get("/v1/billing/transactions", params=new_user)
            assert ledger.status_code == 200
            assert ledger.json()["total"] == 1, "one account, one free grant"

    worker_pids = set(re.findall(r"Started server process \[(\d+)\]", log_path.read_text()))
    assert len(worker_pids) >= 2, log_path.read_text()
    audited = cli(env, "audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert "Audited 2 accounts: clean." in audited.stdout


def test_connections_opened_at_once_spread_over_the_workers(
    postgres_url: str, tmp_path: Path
) -> None:
    """Each worker listens on its own socket (workers.py), so 40 connections opened at once
    land on both workers rather than mostly on whichever woke first."""
    log_path = tmp_path / "server.log"
    with running_service(service_env(postgres_url), log_path, workers=2) as base:
        processes = ServiceProcesses.from_log(log_path)
        processes.wait_for_workers(2)
        port = int(base.rsplit(":", 1)[1])
        with ExitStack() as stack:
            clients = [
                stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
                for _ in range(40)
            ]
            for client in clients:  # answered: the connection is in a worker's hands
                client.sendall(b"GET /health HTTP/1.1\r\nHost: billing\r\n\r\n")
                assert client.recv(4096).startswith(b"HTTP/1.1 200")
            counts = processes.connections_per_worker(port)
    assert sum(counts.values()) == 40, counts
    # Spread by hash: fewer than 8 of 40 on one worker has odds of about 1 in 100,000.
    assert min(counts.values()) >= 8, counts
