"""The HTTP ceiling without ASGI: hello_app's answer (a FastAPI endpoint there) from a bare
protocol on uvloop and httptools (the parser uvicorn uses), two processes on one SO_REUSEPORT
port, no framework, no ASGI messages, no timeouts, nothing else a real server keeps. Not a
server to deploy: the floor under every ASGI server's per-request cost (bench/servers.py
`raw-protocol`).

    .venv/bin/python bench/raw_hello.py PORT
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from typing import Any

import httptools
import uvloop

BODY = b'{"hello":"world"}'
ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    + b"content-length: %d\r\n\r\n" % len(BODY)
    + BODY
)


class Hello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's TCPTransport (not an asyncio.Transport)
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(ANSWER)


def serve(port: int) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1024)
    loop = uvloop.new_event_loop()
    loop.run_until_complete(loop.create_server(Hello, sock=listener))
    loop.run_forever()


if __name__ == "__main__":
    if os.fork() == 0:  # the second worker; the group is stopped together (run.py stop_group)
        serve(int(sys.argv[1]))
    serve(int(sys.argv[1]))
