"""The dashboard: one page at ``/`` that reads the monitoring routes
(:mod:`llmos.server.monitor_api`) every two seconds and draws them.

The page and its assets are files of this package (``static/dashboard``):
plain HTML, CSS and JavaScript with its own small SVG charts — no framework,
no build step, nothing fetched from another host, so it works offline. They
hold no data, so they are served without an API key (see
:data:`PUBLIC_PATHS`, which the access middleware lets through); the page's
own requests to ``/api/…`` carry the key the user pastes into it.

Every response of this router carries a strict Content-Security-Policy: only
this origin's scripts, styles and connections, no inline script or style, no
frames, no forms posting anywhere.
"""

from __future__ import annotations

import hashlib
from importlib import resources

import attrs
from fastapi import APIRouter, Request, Response
from starlette.exceptions import HTTPException

__all__ = ["ASSETS", "CONTENT_SECURITY_POLICY", "PUBLIC_PATHS", "dashboard_router"]

_TAGS = ["dashboard"]

#: what the page may load and do
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

#: served file name -> content type (nothing else under the folder is served)
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "charts.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}

#: the page and its assets: no API key needed, served while the kernel starts
PUBLIC_PATHS: frozenset[str] = frozenset(
    {"/", *(f"/dashboard/{name}" for name in ASSETS if name != "index.html")}
)

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    # revalidate every time (an ETag makes that cheap): an upgraded package
    # shows at the next reload
    "Cache-Control": "no-cache",
}


@attrs.frozen
class _Asset:
    body: bytes
    content_type: str
    etag: str


def _load() -> dict[str, _Asset]:
    folder = resources.files("llmos.server") / "static" / "dashboard"
    out = {}
    for name, content_type in ASSETS.items():
        body = (folder / name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        out[name] = _Asset(body, content_type, etag)
    return out


def dashboard_router() -> APIRouter:
    """``GET /`` (the page) and ``GET /dashboard/{name}`` (its assets)."""
    assets = _load()
    router = APIRouter()

    def send(request: Request, name: str) -> Response:
        asset = assets[name]
        headers = {**_HEADERS, "ETag": asset.etag}
        if asset.etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.content_type, headers=headers)

    @router.get("/", tags=_TAGS, summary="The dashboard", include_in_schema=False)
    def page(request: Request) -> Response:
        return send(request, "index.html")

    @router.get("/dashboard/{name}", tags=_TAGS, include_in_schema=False)
    def asset(name: str, request: Request) -> Response:
        if name not in assets or name == "index.html":
            raise HTTPException(404)  # the app's handler words it: "no route for GET …"
        return send(request, name)

    return router
