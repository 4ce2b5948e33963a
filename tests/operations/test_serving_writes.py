"""Issue 26: serving.py sends a response's status line and headers with its body, in one write.

uvicorn writes them with two `write` calls (profiled: a fifth of a worker's CPU under charges
at 8 connections, bench/PROFILE.md). The held headers must never change what the client gets:
headers and body in order, headers alone when the body comes later (a streamed response), the
rest of a response before the connection closes. Against a real uvicorn server on 127.0.0.1 with
serving.py's protocol, and against the transport wrapper itself.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from ciris_billing.serving import TimedHttpToolsProtocol, _HeadersWithBody


class Recording:
    """A transport that records each write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> Any:
        return f"extra {name}"


async def test_headers_go_out_with_the_body_in_one_write() -> None:
    transport = Recording()
    writer = _HeadersWithBody(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.writes == []
    writer.write(b"body")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    writer.write(b"more")  # later writes go straight out
    assert transport.writes[-1] == b"more"
    await asyncio.sleep(0)  # the scheduled flush finds nothing held
    assert len(transport.writes) == 2
    assert writer.get_extra_info("peername") == "extra peername"


async def test_headers_alone_go_out_on_the_next_turn_and_before_a_close() -> None:
    transport = Recording()
    writer = _HeadersWithBody(transport, asyncio.get_running_loop())  # type: ignore[arg-type]
    writer.write(b"headers")
    await asyncio.sleep(0)
    assert transport.writes == [b"headers"]
    writer.write(b"body")
    assert transport.writes == [b"headers", b"body"]

    closing = Recording()
    writer = _HeadersWithBody(closing, asyncio.get_running_loop())  # type: ignore[arg-type]
    writer.write(b"headers")
    writer.close()
    assert closing.writes == [b"headers"]
    assert closing.closed
    await asyncio.sleep(0)
    assert closing.writes == [b"headers"]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    path = scope["path"]
    headers = [(b"content-type", b"text/plain")]
    if path == "/stream":  # headers now, the body a moment later
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b"late", "more_body": False})
        return
    if path == "/close":
        headers.append((b"connection", b"close"))
    body = b"hello" if scope["method"] != "HEAD" else b""
    headers.append((b"content-length", b"5"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def server() -> AsyncIterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    config = uvicorn.Config(app, http=TimedHttpToolsProtocol, log_config=None, lifespan="off")
    served = uvicorn.Server(config)
    task = asyncio.create_task(served.serve(sockets=[sock]))
    while not served.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        served.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def exchange(port: int, request: bytes, until: bytes, times: int = 1) -> tuple[bytes, float]:
    """What the server answers `request`, read until `until` came `times` times (or the
    connection closed); and how long the headers took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        loop = asyncio.get_running_loop()
        started = loop.time()
        data = b""
        headers_at = None
        while data.count(until) < times:
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            if not chunk:
                break
            data += chunk
            if headers_at is None and b"\r\n\r\n" in data:
                headers_at = loop.time() - started
        return data, headers_at or 0.0
    finally:
        writer.close()


async def test_a_real_server_answers_as_before(server: int) -> None:
    get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    data, _ = await exchange(server, get + get, b"hello", times=2)  # pipelined: both, in order
    assert data.count(b"HTTP/1.1 200 OK") == 2
    assert data.endswith(b"\r\n\r\nhello")

    data, _ = await exchange(server, b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK")
    assert data.endswith(b"\r\n\r\n")

    data, _ = await exchange(server, b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n", b"never")
    assert b"connection: close" in data
    assert data.endswith(b"hello")

    # Headers the app sends before its body reach the client without waiting for the body.
    data, headers_at = await exchange(server, b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n", b"0\r\n")
    assert headers_at < 0.25, headers_at
    assert b"transfer-encoding: chunked" in data
    assert data.endswith(b"4\r\nlate\r\n0\r\n\r\n")
