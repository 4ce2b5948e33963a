"""hello_app's answer from a bare ASGI callable, no framework: served by the service's own server
(bench/servers.py `raw-asgi`), it splits hello's cost into the server's (uvicorn, serving.py's
protocol, the ASGI messages) and FastAPI's (its middleware, routing, dependencies and response).
"""

from __future__ import annotations

from typing import Any

BODY = b'{"hello":"world"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
