"""The web page at ``/``: plain HTML, one script and one stylesheet shipped inside the package
(``microlora/server/web/``), no CDN and no build step, so it works offline. The page is public;
everything it shows comes from the API with the key its user pastes, so it sees exactly what
that key may see.

The HTML is filled in here with what the page must agree on with the server: the composer's
mode names (the server's default chosen), the file types the compiler reads, k's bounds."""

from __future__ import annotations

from functools import cache
from html import escape
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from compiler.documents import SUPPORTED
from microlora.core.config import Mode
from microlora.server.auth import Served
from microlora.server.errors import not_found
from microlora.server.schemas import MAX_K

router = APIRouter(include_in_schema=False)

ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Scripts, styles and requests only from this server; no inline script: the API key sits in
# session storage, so no injected text may ever run as code.
HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; "
                                      "style-src 'self'; img-src 'self' data:; "
                                      "connect-src 'self'; base-uri 'none'; "
                                      "form-action 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
MODE_HINTS = {Mode.PARAMETRIC: "the atoms' adapters, no passage text",
              Mode.CONTEXT: "the atoms' passages in the prompt",
              Mode.HYBRID: "adapters and passages together",
              Mode.NONE: "closed book: the base model alone"}


@cache
def _asset(name: str) -> str:
    return (resources.files("microlora.server") / "web" / name).read_text("utf-8")


@router.get("/")
def page(service: Served) -> HTMLResponse:
    default = service.config.ask
    modes = "".join(f'<option value="{m.value}"{" selected" if m is default.mode else ""}>'
                    f"{m.value}: {escape(MODE_HINTS.get(m, ''))}</option>" for m in Mode)
    html = (_asset("index.html").replace("{{MODES}}", modes)
            .replace("{{ACCEPT}}", escape(",".join(SUPPORTED)))
            .replace("{{TYPES}}", escape(" ".join(SUPPORTED)))
            .replace("{{K}}", str(default.k)).replace("{{MAX_K}}", str(MAX_K)))
    return HTMLResponse(html, headers=HEADERS)


@router.get("/web/{name}")
def asset(name: str) -> Response:
    """The page's script and stylesheet (only those: nothing else of the package is served)."""
    if name not in ASSETS:
        raise not_found("file", name)
    return Response(_asset(name), media_type=ASSETS[name], headers=HEADERS)
