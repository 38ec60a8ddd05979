"""The radiologist's worklist page and the API documentation, served from files inside the package.

Nothing is loaded from the internet: the page is plain HTML, CSS and a JavaScript module
(``static/``), Swagger UI and ReDoc are vendored with their licences (``static/vendor``). These
routes carry no patient data and need no credentials; every data call the page makes goes to
the authenticated API with the user's API key or OpenID Connect access token. They are not in
the OpenAPI schema (they are not API operations).
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(str(files("dashboard_api") / "static"))
STATIC_PATH = "/static"

router = APIRouter(include_in_schema=False)

_COMMON_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def page_config(request: Request) -> dict:
    """What the page needs before anyone has logged in (no secrets: the OIDC client is public)."""
    settings = request.app.state.settings
    oidc = None
    if settings.oidc_enabled and settings.oidc_client_id:
        oidc = {"issuer": settings.oidc_issuer, "client_id": settings.oidc_client_id, "scopes": settings.oidc_scopes}
    return {"version": request.app.version, "oidc": oidc, "refresh_seconds": settings.worklist_refresh_seconds}


def _page_csp(request: Request) -> str:
    settings = request.app.state.settings
    idp = _origin(settings.oidc_issuer) if settings.oidc_enabled and settings.oidc_client_id else ""
    return ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            f"connect-src 'self' {idp}".rstrip() + "; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


#: Swagger UI and ReDoc set inline styles and ReDoc searches in a blob: worker; scripts stay our own files.
_DOCS_CSP = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
             "font-src 'self' data:; connect-src 'self'; worker-src blob:; base-uri 'none'; frame-ancestors 'none'")


def _html(name: str, csp: str, replacements: dict[str, str] | None = None) -> HTMLResponse:
    text = (STATIC_DIR / name).read_text(encoding="utf-8")
    for placeholder, value in (replacements or {}).items():
        text = text.replace(placeholder, value)
    return HTMLResponse(text, headers={**_COMMON_HEADERS, "Content-Security-Policy": csp})


@router.get("/")
def worklist_page(request: Request) -> HTMLResponse:
    """The worklist page; its configuration rides in a JSON data block (never executed)."""
    config = json.dumps(page_config(request)).replace("<", "\\u003c")
    return _html("index.html", _page_csp(request), {"{{CONFIG}}": config})


@router.get("/index.html")
def index_html() -> RedirectResponse:
    return RedirectResponse("./", status_code=308)


@router.get("/docs")
def swagger_ui() -> HTMLResponse:
    return _html("docs.html", _DOCS_CSP)


@router.get("/redoc")
def redoc() -> HTMLResponse:
    return _html("redoc.html", _DOCS_CSP)


def mount_static(app) -> None:
    app.mount(STATIC_PATH, StaticFiles(directory=STATIC_DIR), name="static")
