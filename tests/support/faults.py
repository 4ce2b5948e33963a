"""Fault injection for tests, on 127.0.0.1 only: proxies that fail on demand, the service's own
processes (found and killed by pid, only ours), and concurrent charges checked against the ledger.

- `HttpFaultProxy`: an HTTP reverse proxy (aiohttp, its own thread and event loop) in front of
  a provider such as localstripe. Modes: forward, answer 500, or drop the connection without an
  answer (what a stopped provider looks like); each request may first be held for `delay`
  seconds (`release()` lets the held ones go). Every request is recorded with the client's
  source port, so a test can tell which worker process is waiting on it.
- `TcpFaultProxy`: a TCP proxy in front of PostgreSQL. `down()` cuts every connection and
  refuses new ones (a database restart, seen from the service), `up()` listens again on the
  same port.
- `ServiceProcesses`: the pids of a `running_service` (the uvicorn parent, checked to be a child
  of this test process, and its worker processes).
- `fire_charges` / `settle` / `check_charges`: many charges, each with its own Idempotency-Key
  and description; afterwards every request without a 2xx is retried with its key, and the
  `charges` table must hold exactly one row per 2xx answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from aiohttp import ClientError, ClientSession, ClientTimeout, web
from sqlalchemy import select

from ciris_billing.db import charges, create_engine
from ciris_billing.payments.providers import signing

T = TypeVar("T")

# --- a background event loop ------------------------------------------------------------------


class _LoopThread:
    """An asyncio event loop in a daemon thread; `call` runs a coroutine there and waits."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, make: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


def _listening_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


# --- HTTP: a provider that is slow, failing or gone ----------------------------------------------

ProxyMode = Literal["forward", "error", "drop"]
_HOP_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
)


@dataclass(frozen=True, slots=True)
class SeenRequest:
    method: str
    path: str
    client_port: int
    at: float


@dataclass
class HttpFaultProxy:
    """See the module docstring. Change `mode`, `delay` and `upstream` at any time."""

    upstream: str
    mode: ProxyMode = "forward"
    delay: float = 0.0
    url: str = ""
    seen: list[SeenRequest] = field(default_factory=list)
    _thread: _LoopThread | None = field(default=None, repr=False)
    _runner: web.AppRunner | None = field(default=None, repr=False)
    _session: ClientSession | None = field(default=None, repr=False)
    _wake: asyncio.Event | None = field(default=None, repr=False)

    def set(self, mode: ProxyMode | None = None, delay: float | None = None) -> None:
        if mode is not None:
            self.mode = mode
        if delay is not None:
            self.delay = delay
            if delay > 0:
                self._on_loop(lambda wake: wake.clear())

    def release(self) -> None:
        """Stop delaying: requests being held go on now, new ones are not held."""
        self.delay = 0.0
        self._on_loop(lambda wake: wake.set())

    def requests_to(self, path_part: str) -> list[SeenRequest]:
        return [seen for seen in list(self.seen) if path_part in seen.path]

    def wait_for_request(self, path_part: str, timeout: float = 20) -> SeenRequest:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.requests_to(path_part)
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no request for {path_part} reached the proxy in {timeout} s")

    def _on_loop(self, action: Callable[[asyncio.Event], None]) -> None:
        """Run `action` on the proxy's loop and wait for it (asyncio.Event is not thread-safe)."""
        if self._thread is not None and self._wake is not None:
            wake = self._wake

            async def run() -> None:
                action(wake)

            self._thread.call(run)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        port = int(peer[1]) if peer else 0
        self.seen.append(SeenRequest(request.method, request.path_qs, port, time.monotonic()))
        body = await request.read()
        if self.delay > 0 and self._wake is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.delay)
        if self.mode == "error":
            return web.json_response(
                {"error": {"type": "api_error", "message": "Injected fault: internal error"}},
                status=500,
            )
        if self.mode == "forward":
            assert self._session is not None
            headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
            try:
                async with self._session.request(
                    request.method, self.upstream + request.path_qs, headers=headers, data=body
                ) as answer:
                    content = await answer.read()
                    kept = {
                        k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS
                    }
                    return web.Response(status=answer.status, body=content, headers=kept)
            except (ClientError, OSError):
                pass  # the provider is gone: so is the answer
        # "drop" (or the upstream is down): close the connection without an answer.
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("dropped by the fault proxy")

    def start(self) -> None:
        self._thread = _LoopThread("http-fault-proxy")
        sock = _listening_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

        async def setup() -> None:
            self._wake = asyncio.Event()
            self._session = ClientSession(timeout=ClientTimeout(total=60), auto_decompress=False)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(
                app, access_log=None, handler_cancellation=True, shutdown_timeout=1
            )
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()

        self._thread.call(setup)

    def stop(self) -> None:
        if self._thread is None:
            return

        async def teardown() -> None:
            if self._wake is not None:
                self._wake.set()
            if self._runner is not None:
                await self._runner.cleanup()
            if self._session is not None:
                await self._session.close()

        with contextlib.suppress(Exception):
            self._thread.call(teardown)
        self._thread.close()
        self._thread = None


@contextlib.contextmanager
def http_fault_proxy(upstream: str) -> Iterator[HttpFaultProxy]:
    proxy = HttpFaultProxy(upstream)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


# --- TCP: a database that goes away and comes back -----------------------------------------------


class TcpFaultProxy:
    """A TCP proxy on 127.0.0.1 to `upstream_port`; `down()` / `up()` (see the module doc)."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._thread = _LoopThread("tcp-fault-proxy")
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        sock = _listening_socket()
        self.port: int = sock.getsockname()[1]
        self._thread.call(lambda: self._serve(sock))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer.transport, up_writer.transport)
        self._transports.update(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._transports.difference_update(pair)

    async def _serve(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = _listening_socket(self.port)
        self._server = await asyncio.start_server(self._connection, sock=sock)

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    def down(self) -> None:
        """Refuse new connections and cut every open one (as a database restart does)."""
        self._thread.call(self._down)

    def up(self) -> None:
        self._thread.call(self._serve)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._thread.call(self._down)
        self._thread.close()


@contextlib.contextmanager
def tcp_fault_proxy(upstream_port: int) -> Iterator[TcpFaultProxy]:
    proxy = TcpFaultProxy(upstream_port)
    try:
        yield proxy
    finally:
        proxy.close()


@contextlib.contextmanager
def proxied_database(database_url: str) -> Iterator[tuple[TcpFaultProxy, str]]:
    """A proxy in front of `database_url`'s server (on 127.0.0.1), and the URL through it."""
    parts = urlsplit(database_url)
    with tcp_fault_proxy(parts.port or 5432) as proxy:
        yield proxy, parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()


# --- the service's processes ----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                found.extend(int(c) for c in (task / "children").read_text().split())
    return found


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


@dataclass(frozen=True)
class ServiceProcesses:
    """A multi-worker `running_service`: its uvicorn parent (a child of this process)."""

    parent: int

    @classmethod
    def from_log(cls, log_path: Path, timeout: float = 20) -> ServiceProcesses:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(r"Started parent process \[(\d+)\]", log_path.read_text())
            if found:
                parent = int(found.group(1))
                # Ours only: the server this test process started.
                assert _parent_of(parent) == os.getpid(), f"pid {parent} is not ours"
                return cls(parent)
            if time.monotonic() > deadline:
                raise AssertionError(f"no uvicorn parent in the log:\n{log_path.read_text()}")
            time.sleep(0.1)

    def workers(self) -> list[int]:
        """The live worker processes (multiprocessing's spawn children; not its tracker)."""
        return sorted(
            pid
            for pid in _children(self.parent)
            if "spawn_main" in _cmdline(pid) and _parent_of(pid) == self.parent
        )

    def wait_for_workers(self, count: int, timeout: float = 30) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            workers = self.workers()
            if len(workers) >= count:
                return workers
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(workers)} of {count} workers after {timeout} s")
            time.sleep(0.1)

    def wait_for_started(self, log_path: Path, count: int, timeout: float = 60) -> None:
        """Until the server's log says its workers completed start-up `count` times in all (a
        worker process exists seconds before it serves: it imports the app first)."""
        deadline = time.monotonic() + timeout
        while log_path.read_text().count("Application startup complete") < count:
            if time.monotonic() > deadline:
                tail = log_path.read_text()[-4000:]
                raise AssertionError(
                    f"fewer than {count} worker start-ups after {timeout} s; the log ends:\n{tail}"
                )
            time.sleep(0.1)

    def kill_worker(self, pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal one of this server's workers (checked: a worker of ours, by pid)."""
        assert pid in self.workers(), f"pid {pid} is not a worker of {self.parent}"
        os.kill(pid, sig)

    def _sockets_of(self, pid: int) -> set[str]:
        found = set()
        with contextlib.suppress(FileNotFoundError, PermissionError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    found.add(os.readlink(fd))
        return found

    def worker_with_port(self, local_port: int) -> int | None:
        """The worker that holds the TCP socket whose local port is `local_port`."""
        inodes = _tcp_inodes(lambda local, _state, _unread: local == local_port)
        for pid in self.workers():
            if self._sockets_of(pid) & inodes:
                return pid
        return None

    def unread_requests(self, pid: int, server_port: int) -> int:
        """Client connections to `server_port` in worker `pid` with bytes it has not read."""
        pending = _tcp_inodes(
            lambda local, state, unread: local == server_port and state == "01" and unread > 0
        )
        return len(self._sockets_of(pid) & pending)

    def connections_per_worker(self, server_port: int) -> dict[int, int]:
        """How many client connections to `server_port` each worker holds right now."""
        established = _tcp_inodes(
            lambda local, state, _unread: local == server_port and state == "01"
        )
        return {pid: len(self._sockets_of(pid) & established) for pid in self.workers()}

    def busiest_worker(self, server_port: int) -> int:
        """The worker holding the most client connections to `server_port` right now."""
        counts = self.connections_per_worker(server_port)
        return max(counts, key=lambda pid: counts[pid])


def _tcp_inodes(keep: Callable[[int, str, int], bool]) -> set[str]:
    """`socket:[inode]` of the TCP sockets whose (local port, state, unread bytes) `keep`
    accepts (from /proc/net/tcp*)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                columns = line.split()
                local_port = int(columns[1].rsplit(":", 1)[1], 16)
                unread = int(columns[4].split(":")[1], 16)
                if keep(local_port, columns[3], unread):
                    inodes.add(f"socket:[{columns[9]}]")
    return inodes


# --- many charges, then the ledger ---------------------------------------------------------------

USES_PER_USER = 3 + 8  # 3 free uses + initial_balance_minor 8 paid uses


@dataclass
class Attempt:
    """One charge request: its key and body, its first answer, and its answer once settled."""

    key: str
    body: dict[str, Any]
    status: int | None = None  # None: no HTTP answer (the connection broke)
    answer: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    final_status: int | None = None
    final_answer: dict[str, Any] = field(default_factory=dict)
    replayed: bool = False

    @property
    def charge_id(self) -> str | None:
        if self.final_status == 201:
            value = self.final_answer.get("charge_id")
            return str(value) if value else None
        return None


def users(prefix: str, count: int) -> list[dict[str, str]]:
    return [
        {"oauth_provider": "oauth:google", "external_id": f"{prefix}-{i}@example.com"}
        for i in range(count)
    ]


async def create_accounts(http: httpx.AsyncClient, people: list[dict[str, str]]) -> None:
    """Each with 3 free uses and 8 paid ones (USES_PER_USER)."""
    for person in people:
        created = await http.post(
            "/v1/billing/accounts", json={**person, "initial_balance_minor": USES_PER_USER - 3}
        )
        assert created.status_code == 201, created.text


def charge_attempts(prefix: str, people: list[dict[str, str]], per_user: int) -> list[Attempt]:
    """`per_user` charges for each person, round robin."""
    return [
        Attempt(
            key=f"{prefix}-{u}-{n}",
            body={**person, "amount_minor": 1, "description": f"{prefix} charge {u}/{n}"},
        )
        for n in range(per_user)
        for u, person in enumerate(people)
    ]


async def _post(http: httpx.AsyncClient, attempt: Attempt) -> httpx.Response:
    return await http.post(
        "/v1/billing/charges", json=attempt.body, headers={"Idempotency-Key": attempt.key}
    )


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"raw": response.text[:200]}
    return body if isinstance(body, dict) else {"raw": body}


async def fire_charges(
    http: httpx.AsyncClient,
    attempts: list[Attempt],
    concurrency: int = 48,
    on_answer: Callable[[int], None] | None = None,
) -> None:
    """Send every attempt once, `concurrency` at a time; record each first answer."""
    gate = asyncio.Semaphore(concurrency)
    done = 0

    async def one(attempt: Attempt) -> None:
        nonlocal done
        async with gate:
            try:
                response = await _post(http, attempt)
            except httpx.TransportError as exc:
                attempt.error = type(exc).__name__
            else:
                attempt.status = response.status_code
                attempt.answer = _json(response)
            done += 1
            if on_answer is not None:
                on_answer(done)

    await asyncio.gather(*(one(attempt) for attempt in attempts))


async def settle(
    http: httpx.AsyncClient, attempts: list[Attempt], timeout: float = 60, concurrency: int = 16
) -> None:
    """Retry every attempt without a 2xx, with its key, until it has a definite answer."""
    deadline = time.monotonic() + timeout
    gate = asyncio.Semaphore(concurrency)

    async def one(attempt: Attempt) -> None:
        if attempt.status is not None and 200 <= attempt.status < 300:
            attempt.final_status, attempt.final_answer = attempt.status, attempt.answer
            return
        while True:
            async with gate:
                try:
                    response: httpx.Response | None = await _post(http, attempt)
                except httpx.TransportError:
                    response = None
            if response is not None and response.status_code != 503:
                attempt.final_status = response.status_code
                attempt.final_answer = _json(response)
                attempt.replayed = response.headers.get("Idempotent-Replayed") == "true"
                return
            assert time.monotonic() < deadline, f"{attempt.key} still failing after {timeout} s"
            await asyncio.sleep(0.2)

    await asyncio.gather(*(one(attempt) for attempt in attempts))


async def charge_rows(database_url: str, prefix: str) -> list[tuple[str, str | None, str | None]]:
    """(id, idempotency_key, description) of every charge whose key starts with `prefix`."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            result = await conn.execute(
                select(charges.c.id, charges.c.idempotency_key, charges.c.description).where(
                    charges.c.idempotency_key.like(f"{prefix}-%")
                )
            )
            return [(row.id, row.idempotency_key, row.description) for row in result]
    finally:
        await engine.dispose()


@dataclass(frozen=True)
class LedgerCheck:
    first_statuses: dict[str, int]
    final_statuses: dict[str, int]
    replayed: int
    rows: int

    def summary(self) -> str:
        return (
            f"first answers {self.first_statuses}, settled {self.final_statuses}, "
            f"{self.replayed} replayed after a lost answer, {self.rows} charge rows"
        )


async def check_charges(
    database_url: str, prefix: str, attempts: list[Attempt], per_user: int
) -> LedgerCheck:
    """The charges table holds exactly one row per 2xx answer, and nothing else.

    - every first 201 has its row (same charge id);
    - an attempt with no 2xx at first has a row only if its retry replayed a 201
      (the commit went through but the answer was lost: the idempotency key finds it);
    - no key and no description has two rows; every user got all of the uses it had.
    """
    rows = await charge_rows(database_url, prefix)
    by_id = {row_id: key for row_id, key, _ in rows}
    keys = [key for _, key, _ in rows]
    descriptions = [description for _, _, description in rows]
    assert len(set(keys)) == len(keys), "a key was charged twice"
    assert len(set(descriptions)) == len(descriptions), "a request was charged twice"
    assert len(by_id) == len(rows)
    answered = {}
    for attempt in attempts:
        if attempt.status == 201:
            assert by_id.get(attempt.answer["charge_id"]) == attempt.key, (
                f"a 201 without its row: {attempt.key}"
            )
            assert attempt.final_answer == attempt.answer
        if attempt.replayed:
            assert attempt.status in (None, 503), f"{attempt.key}: replayed after {attempt.status}"
        assert attempt.final_status in (201, 402), (attempt.key, attempt.final_answer)
        if attempt.charge_id is not None:
            answered[attempt.charge_id] = attempt.key
    assert answered == by_id, "charges rows differ from the 2xx answers"
    # No use lost: each user ends with min(per_user, its uses) charges.
    per_person: dict[str, int] = {}
    for attempt in attempts:
        who = attempt.body["external_id"]
        per_person[who] = per_person.get(who, 0) + (attempt.final_status == 201)
    assert set(per_person.values()) == {min(per_user, USES_PER_USER)}, per_person

    def count(values: list[int | None]) -> dict[str, int]:
        found: dict[str, int] = {}
        for value in values:
            name = "no answer" if value is None else str(value)
            found[name] = found.get(name, 0) + 1
        return dict(sorted(found.items()))

    return LedgerCheck(
        first_statuses=count([a.status for a in attempts]),
        final_statuses=count([a.final_status for a in attempts]),
        replayed=sum(a.replayed for a in attempts),
        rows=len(rows),
    )


def dump(attempts: list[Attempt], limit: int = 5) -> str:
    """A few odd answers, for assertion messages."""
    odd = [a for a in attempts if a.status not in (201, 402)]
    return json.dumps(
        [{"key": a.key, "status": a.status, "answer": a.answer, "error": a.error} for a in odd][
            :limit
        ]
    )


def signed_event(event_id: str, payment_id: str, secret: str) -> tuple[bytes, dict[str, str]]:
    """A payment_intent.succeeded event as Stripe sends it: body and Stripe-Signature header."""
    payload = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": "payment_intent.succeeded",
            "created": int(time.time()),
            "data": {"object": {"id": payment_id, "object": "payment_intent"}},
        }
    ).encode()
    return payload, {"Stripe-Signature": signing.sign(payload, secret)}
