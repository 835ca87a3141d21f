"""The browser side: the playground page at GET /, its static assets, and offline /docs and /redoc.

Every asset comes from app/static (the page's own files) or app/static/vendor (Swagger UI and ReDoc, pinned,
with their licences), so the page and the API documentation render on a machine without internet.
"""

from __future__ import annotations

import asyncio
import functools
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi import Path as PathParam
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response

from app.api.schemas import PROBLEM_RESPONSES
from app.errors import NotFound

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
VENDOR_DIR = STATIC_DIR / "vendor"
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml",
    ".png": "image/png", ".txt": "text/plain; charset=utf-8",
}
# the page runs only its own scripts and talks only to this origin; blob: and data: are the images it makes
PAGE_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; object-src 'none'; base-uri 'self'; frame-ancestors 'none'; form-action 'self'")


# ReDoc's side menu shows Redocly's logo from their CDN: on an offline machine that is a request to another host,
# so the served copy points it at an empty inline image instead (the file on disk stays byte-identical upstream)
REDOC_LOGO = b'"https://cdn.redoc.ly/redoc/logo-mini.svg"'
EMPTY_SVG = b'"data:image/svg+xml,%3Csvg xmlns=%22http://www.w3.org/2000/svg%22/%3E"'
ASSET_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def find_asset(name: str) -> tuple[Path, bool] | None:
    """(file, vendored) for an asset name: a plain file name with a served suffix in app/static or its vendor/
    folder; anything else (paths, hidden files, other suffixes) is None."""
    if not ASSET_NAME.fullmatch(name) or Path(name).suffix not in MEDIA_TYPES:
        return None
    for folder, vendored in ((STATIC_DIR, False), (VENDOR_DIR, True)):
        path = folder / name
        if path.is_file():
            return path, vendored
    return None


router = APIRouter(tags=["playground"])


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


@router.get("/", response_class=HTMLResponse, summary="The playground (a web page for every application)",
            responses={200: {"content": {"text/html": {}}, "description": "the playground page"}})
async def playground() -> HTMLResponse:
    """A single page that calls this API from the browser: classify, faces, text and style transfer."""
    html = await asyncio.to_thread((STATIC_DIR / "index.html").read_text, encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache",
                                       "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})


@functools.lru_cache(maxsize=1)
def _offline_redoc(path: Path) -> bytes:
    """ReDoc's bundle with its one CDN logo URL replaced, read and patched once (1 MB; the file on disk stays
    byte-identical to upstream)."""
    return path.read_bytes().replace(REDOC_LOGO, EMPTY_SVG)


@router.get("/static/{asset}", summary="A static asset of the playground or of the API documentation",
            response_class=FileResponse,
            responses={200: {"content": {t.split(";")[0]: {} for t in MEDIA_TYPES.values()}, "description":
                             "the file"}, 404: {**PROBLEM_RESPONSES[404], "description": "No such asset"},
                       422: PROBLEM_RESPONSES[422]})
async def static_asset(asset: Annotated[str, PathParam(max_length=100, description="file name")]) -> Response:
    """The page's scripts and styles, and the pinned Swagger UI and ReDoc files (see app/static/vendor)."""
    found = find_asset(asset)
    if found is None:
        raise NotFound(f"no asset {asset!r}")
    path, vendored = found
    headers = {"Cache-Control": "public, max-age=86400" if vendored else "no-cache",
               "X-Content-Type-Options": "nosniff"}
    if asset == "redoc.standalone.js":
        body = await asyncio.to_thread(_offline_redoc, path)
        return Response(body, media_type=MEDIA_TYPES[path.suffix], headers=headers)
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers=headers)


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI from this service's own copy of its files."""
    base = _base(request)
    app: Any = request.app
    return get_swagger_ui_html(
        openapi_url=base + app.openapi_url, title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{base}/static/swagger-ui-bundle.js", swagger_css_url=f"{base}/static/swagger-ui.css",
        swagger_favicon_url=f"{base}/static/favicon.svg", oauth2_redirect_url=f"{base}/docs/oauth2-redirect",
        swagger_ui_parameters=app.swagger_ui_parameters)


@router.get("/docs/oauth2-redirect", include_in_schema=False)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc from this service's own copy, without web fonts from another host."""
    base = _base(request)
    app: Any = request.app
    return get_redoc_html(openapi_url=base + app.openapi_url, title=f"{app.title} - ReDoc",
                          redoc_js_url=f"{base}/static/redoc.standalone.js",
                          redoc_favicon_url=f"{base}/static/favicon.svg", with_google_fonts=False)
