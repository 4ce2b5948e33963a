"""Finding 11 (issue 12): slow clients held idle and half-sent requests for 70+ s.

Against a real `ciris-billing serve` on 127.0.0.1: 200 slow sockets (100 sending a request's
headers a byte at a time, 100 sending full headers and then only part of the body they
announced) barely change the p99 of other clients' credit checks, and each slow socket is
answered 408 and closed once the read timeouts pass.

The p99 figures are printed, not held to a few milliseconds here: a timed assertion on a shared
2-core machine (and beside the rest of the suite) measures the neighbours. The test bounds only
a stall (a server that waited on slow sockets would add seconds); measured alone, the p99 moved
by 0.7 to 4 ms with the 200 slow sockets open.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from pathlib import Path

import httpx

from tests.support.cli import create_key
from tests.support.servers import running_service, service_env

TIMEOUT = 2.0  # HEADER_READ_TIMEOUT_SECONDS and BODY_READ_TIMEOUT_SECONDS for this test
SLOW = 200
CHECK = b'{"oauth_provider":"oauth:google","external_id":"fast@example.com"}'


def p99(http: httpx.Client, key: str, count: int = 300) -> float:
    took = []
    for _ in range(count):
        started = time.perf_counter()
        answer = http.post(
            "/v1/billing/credits/check",
            content=CHECK,
            headers={"X-API-Key": key, "Content-Type": "application/json"},
        )
        took.append(time.perf_counter() - started)
        assert answer.status_code == 200, answer.text
    return statistics.quantiles(took, n=100)[98] * 1000


class SlowClients:
    """Slow sockets on a thread of their own: every 50 ms, one more header byte each."""

    def __init__(self, port: int, key: str) -> None:
        self.sockets: list[socket.socket] = []
        self.closed_after: dict[int, float] = {}
        self.answers: dict[int, bytes] = {}
        self.stop = threading.Event()
        request = (
            b"POST /v1/billing/credits/check HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
            b"X-API-Key: " + key.encode() + b"\r\n\r\n"
        )
        self.pending: list[bytes] = []
        for index in range(SLOW):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setblocking(False)
            self.sockets.append(sock)
            if index % 2:  # headers complete (a valid key), then part of the body, then nothing
                sock.sendall(request + b'{"oauth_pr')
                self.pending.append(b"")
            else:  # headers, a byte at a time
                self.pending.append(request)
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self._drip, daemon=True)
        self.thread.start()

    def _drip(self) -> None:
        while not self.stop.wait(0.05):
            for index, sock in enumerate(self.sockets):
                if index in self.closed_after:
                    continue
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""
                if data is not None:
                    self.answers[index] = self.answers.get(index, b"") + data
                    if data == b"":
                        self.closed_after[index] = time.monotonic() - self.started
                        continue
                if self.pending[index]:
                    try:
                        sock.send(self.pending[index][:1])
                        self.pending[index] = self.pending[index][1:]
                    except OSError:
                        pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.sockets:
            sock.close()


def test_finding_11_slow_clients_are_cut_off_and_delay_no_one(
    fresh_database: str, tmp_path: Path
) -> None:
    env = service_env(
        fresh_database,
        HEADER_READ_TIMEOUT_SECONDS=str(TIMEOUT),
        BODY_READ_TIMEOUT_SECONDS=str(TIMEOUT),
        RATE_LIMIT_ACCOUNT_PER_MINUTE="1000000",
        ACCESS_LOG="false",
    )
    key = create_key(env, "read")
    with running_service(env, tmp_path / "serve.log") as base:
        port = int(base.rsplit(":", 1)[1])
        with httpx.Client(base_url=base, timeout=10) as http:
            p99(http, key, 100)  # warm up
            alone = p99(http, key)
            slow = SlowClients(port, key)
            try:
                crowded = p99(http, key)
                deadline = time.monotonic() + 2 * TIMEOUT + 5
                while len(slow.closed_after) < SLOW and time.monotonic() < deadline:
                    time.sleep(0.1)
            finally:
                slow.close()
            after = p99(http, key)
    print(f"p99 alone {alone:.2f} ms, with {SLOW} slow sockets {crowded:.2f} ms, after {after:.2f}")
    assert len(slow.closed_after) == SLOW, f"{SLOW - len(slow.closed_after)} slow sockets open"
    assert max(slow.closed_after.values()) < 2 * TIMEOUT + 2
    answered = {answer.split(b"\r\n", 1)[0] for answer in slow.answers.values()}
    assert answered == {b"HTTP/1.1 408 Request Timeout"}, answered
    # No stall: other clients are served while the slow sockets wait (a server that waited on
    # them would add seconds). The figures themselves are printed above.
    baseline = max(alone, after)
    assert crowded <= baseline + 250, f"p99 {baseline:.2f} ms alone, {crowded:.2f} ms with slow"
