"""The API documentation, public by design (SPEC: what is public): `/openapi.json`, `/docs`
(Swagger UI) and `/redoc` (ReDoc).

Their scripts and styles come from this service, never a CDN, so the pages render offline and
the Content-Security-Policy allows nothing but this service: the Swagger UI and ReDoc bundles
the `fastapi-offline` package ships (only its static files are used; pinned in
pyproject.toml), and our own `docs.js`, which starts Swagger UI (no inline script). The pages
carry the console's security headers; ReDoc and Swagger UI style their elements inline (the
one thing their policy allows beyond the console's: `style-src 'unsafe-inline'`), and draw
icons from `data:` images.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from ciris_billing.web.templating import PAGE_HEADERS, static_file

router = APIRouter(include_in_schema=False)

ASSETS_PATH = "/docs/assets"
DOCS_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ]
)
DOCS_HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": DOCS_POLICY}
# /openapi.json: a document, never a page (nothing in it runs, nothing frames it).
DOCUMENT_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
# name -> media type; the bundles from fastapi-offline, docs.js from this package.
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript",
    "docs.js": "text/javascript",
}


@lru_cache
def asset(name: str) -> bytes:
    if name == "docs.js":
        return static_file(name).encode()
    return files("fastapi_offline").joinpath("static", name).read_bytes()


@lru_cache
def asset_url(name: str) -> str:
    """The asset's URL with its content's digest, so a browser never keeps a stale copy."""
    return f"{ASSETS_PATH}/{name}?v={hashlib.sha256(asset(name)).hexdigest()[:12]}"


def _page(request: Request, title: str, body: str, styles: str = "") -> HTMLResponse:
    root = request.scope.get("root_path", "")
    html = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n{styles}</head>\n<body>\n{body}\n</body>\n</html>\n"
    ).replace('="/', f'="{root}/')
    return HTMLResponse(html, headers=DOCS_HEADERS)


@router.get("/openapi.json")
async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.openapi(), headers=DOCUMENT_HEADERS)


@router.get("/docs")
async def swagger_ui(request: Request) -> Response:
    return _page(
        request,
        "CIRIS Billing API (Swagger UI)",
        '<div id="swagger-ui" data-openapi-url="/openapi.json"></div>\n'
        f'<script src="{asset_url("swagger-ui-bundle.js")}"></script>\n'
        f'<script src="{asset_url("docs.js")}"></script>',
        f'<link rel="stylesheet" href="{asset_url("swagger-ui.css")}">\n',
    )


@router.get("/redoc")
async def redoc(request: Request) -> Response:
    return _page(
        request,
        "CIRIS Billing API (ReDoc)",
        '<redoc spec-url="/openapi.json"></redoc>\n'
        f'<script src="{asset_url("redoc.standalone.js")}"></script>',
    )


@router.get(ASSETS_PATH + "/{name}")
async def docs_asset(name: str) -> Response:
    if name not in ASSETS:
        return Response(status_code=404)
    return Response(
        asset(name),
        media_type=ASSETS[name],
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )
