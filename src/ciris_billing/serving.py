"""The HTTP protocol `serve` runs: uvicorn's (httptools), with request read timeouts.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) but has no timeout for reading
a request: a client that sends its headers a byte at a time, or announces a body and never sends
it, holds a connection (and the request's task, waiting in `receive`) for as long as it likes.
This protocol arms a timer from the first byte of a request (or the connection's opening) to
the end of its headers (HEADER_READ_TIMEOUT_SECONDS), then to the end of its body
(BODY_READ_TIMEOUT_SECONDS). When it fires, a request not yet answered gets a 408 in the one
error shape, and the connection is closed (the app's `receive` then says the client is gone).
At the protocol level, the timers cost a request no more than setting a deadline (one timer per
connection, moved only when a deadline comes earlier than it fires: it re-arms itself for a
later one), and the event loop never runs a coroutine for a slow client until its headers are
complete.

It also sends each response's status line and headers together with its body, in one write:
uvicorn writes them separately (two `write` calls, two TCP segments, two wake-ups of the
client). Profiled under charges at 8 connections, those writes were a fifth of a worker's samples
(bench/PROFILE.md).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ciris_billing.config import get_settings

_BODY = json.dumps(
    {"error": "request_timeout", "detail": "The request was not sent in time"},
    separators=(",", ":"),
).encode()
_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\nconnection: close\r\n\r\n" + _BODY
)


# A timer may fire a little before its time (the event loop's clock resolution): a deadline
# this close counts as passed, rather than re-arming for a moment.
_EARLY = 0.01


class _HeadersWithBody:
    """A response's transport (one per request): its first write (the status line and headers)
    is held and goes out with the next one (the body), in one `write`. If no body follows before
    the event loop's next turn (a response that streams later), the headers go out alone then.
    Every other write, and close, goes straight to the connection's transport, after anything
    held: the order of the bytes never changes."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop: asyncio.AbstractEventLoop | None = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._loop is not None:  # the response's first write: hold it for the body
            self._held, loop, self._loop = data, self._loop, None
            loop.call_soon(self._flush)
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._transport.write(data)

    def _flush(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class TimedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body read timeouts (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.header_timeout = settings.header_read_timeout_seconds
        self.body_timeout = settings.body_read_timeout_seconds
        # The read deadline (loop time; None: not reading a request) and the one timer that
        # checks it. Re-arming per request only moves the deadline (three timer handles made
        # and cancelled per request, profiled, cost more than the protocol's own parsing).
        self._deadline: float | None = None
        self._read_timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def _arm(self, seconds: float) -> None:
        deadline = self.loop.time() + seconds
        self._deadline = deadline
        if self._read_timer is not None and self._timer_at <= deadline:
            return  # it fires first, and re-arms itself for this deadline
        self._set_timer(deadline)

    def _set_timer(self, at: float) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
        self._timer_at = at
        self._read_timer = self.loop.call_at(at, self._read_timed_out)

    def _disarm(self) -> None:
        self._deadline = None  # the timer, when it fires, finds nothing to time out

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout)  # a connection that never sends a request

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.header_timeout)

    def on_headers_complete(self) -> None:
        previous = self.cycle
        super().on_headers_complete()
        if self.cycle is not previous:  # a new request's cycle (an upgrade request gets none)
            # Its task is created, not yet run: it writes through this from its first write.
            self.cycle.transport = _HeadersWithBody(self.transport, self.loop)  # type: ignore[assignment]
        self._arm(self.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Answered: idle from now on is the keep-alive timeout's business (unless the client
        # is still sending a body nobody reads: then the body timer still closes it).
        if self.cycle is None or not self.cycle.more_body:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._read_timer = None
        deadline = self._deadline
        if deadline is None:
            return  # nothing being read: the next request's headers arm it again
        if deadline - self.loop.time() > _EARLY:
            self._set_timer(deadline)  # moved later since this timer was set
            return
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_TIMEOUT_RESPONSE)
        self.transport.close()
