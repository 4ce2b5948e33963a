"""A webhook receiver on 127.0.0.1, as a consumer would write one: every delivery is verified
with the `standardwebhooks` library before it counts. It can go down (connections refused) and
come back on the same port, or answer with another status."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True)
class Received:
    webhook_id: str
    timestamp: str
    signature: str
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


@dataclass
class Receiver:
    """What arrived; `secret` verifies it (set once the endpoint exists); `status` answers."""

    port: int = 0
    secret: str | None = None
    status: int = 200
    delay: float = 0.0  # seconds before answering (a slow receiver)
    wait_for: threading.Event | None = None  # answer only once this is set (at most 5 s)
    signal: threading.Event | None = None  # set once a delivery is verified
    received: list[Received] = field(default_factory=list)  # verified and answered 2xx
    attempts: list[Received] = field(default_factory=list)  # every verified request
    rejected: list[str] = field(default_factory=list)  # why unverifiable ones were refused
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def ids(self) -> list[str]:
        with self._lock:
            return [r.webhook_id for r in self.received]

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(length)
                headers = {k: v for k, v in self.headers.items()}
                status = receiver.accept(headers, body)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def accept(self, headers: dict[str, str], body: bytes) -> int:
        try:
            assert self.secret is not None, "no secret yet"
            Webhook(self.secret).verify(body, headers)
        except (WebhookVerificationError, AssertionError, ValueError) as exc:
            with self._lock:
                self.rejected.append(str(exc))
            return 400
        lower = {k.lower(): v for k, v in headers.items()}
        got = Received(
            lower["webhook-id"], lower["webhook-timestamp"], lower["webhook-signature"], body
        )
        with self._lock:
            self.attempts.append(got)
            status = self.status
            delay = self.delay
        if self.signal is not None:
            self.signal.set()
        if self.wait_for is not None:
            self.wait_for.wait(timeout=5)
        if delay:
            time.sleep(delay)
        if status < 300:
            with self._lock:
                self.received.append(got)
        return status

    def stop(self) -> None:
        """Down: the port refuses connections until start() again."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@contextlib.contextmanager
def receiving(secret: str | None = None) -> Iterator[Receiver]:
    receiver = Receiver(secret=secret)
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.stop()
