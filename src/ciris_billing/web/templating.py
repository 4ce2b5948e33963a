"""Server-rendered pages (Jinja2, autoescaped) and the headers every page is sent with.

The pages work without JavaScript: every action is a form, every list a link. The one script
(static/console.js) only adds conveniences (copy a new key, focus). Style and script come from
this package (no CDN), so the Content-Security-Policy allows nothing but this service.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from functools import lru_cache
from importlib.resources import files
from typing import Any

from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from ciris_billing.checkout.routes import format_price

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)

PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "X-Robots-Tag": "noindex",
}

STATIC_PATH = "/console/static"


def _when(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _uses(value: int) -> str:
    return f"{value:+d}" if value else "0"


@lru_cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("ciris_billing.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["money"] = lambda amount, currency: format_price(int(amount), currency)
    env.filters["when"] = _when
    env.filters["signed"] = _uses
    env.globals["static"] = static_url
    return env


@lru_cache
def static_file(name: str) -> str:
    return files("ciris_billing.web").joinpath("static", name).read_text(encoding="utf-8")


@lru_cache
def static_url(name: str) -> str:
    """The file's URL with its content's digest, so a browser never keeps a stale copy."""
    digest = hashlib.sha256(static_file(name).encode()).hexdigest()[:12]
    return f"{STATIC_PATH}/{name}?v={digest}"


def render(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    for name in ("session", "notice", "nav"):  # what the base pages ask of every page
        context.setdefault(name, None)
    html = environment().get_template(template).render(**context)
    return HTMLResponse(html, status_code=status_code, headers=PAGE_HEADERS)


STATIC_TYPES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript"}


def static_response(name: str) -> Response:
    return Response(
        static_file(name),
        media_type=STATIC_TYPES[name],
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )
