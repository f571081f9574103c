"""`GET /dashboard` (the page), `/dashboard/static/{file}` (its script and style) and
`/dashboard/api/state` (the JSON feed the page polls). Read-only. With API keys configured, these
need a key or the sign-in cookie of `app.dashboard.login`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from app.dashboard.state import dashboard_state
from app.errors import RouteNotFound
from app.web.auth import SESSION_COOKIE
from app.web.context import ApiContext

router = APIRouter()
STATIC = Path(__file__).resolve().parent / "static"
FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
NO_STORE = {"Cache-Control": "no-store"}


@router.get("/dashboard")
async def page(request: Request) -> Response:
    if SESSION_COOKIE not in request.cookies:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_STORE)
    html = (STATIC / "index.html").read_text(encoding="utf-8")  # signed in: show "Sign out"
    html = html.replace('action="dashboard/logout" hidden', 'action="dashboard/logout"')
    return HTMLResponse(html, headers=NO_STORE)


@router.get("/dashboard/static/{name}")
async def static_file(name: str) -> Response:
    if name not in FILES:
        raise RouteNotFound(f"no dashboard file '{name}'")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=NO_STORE)


@router.get("/dashboard/api/state")
async def state(request: Request) -> dict[str, Any]:
    return await dashboard_state(ApiContext.of(request))
