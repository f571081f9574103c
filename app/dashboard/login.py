"""The dashboard's sign-in. A browser cannot send `Authorization: Bearer` when it loads a page, so
`POST /dashboard/login` trades a valid API key for an HttpOnly, SameSite=Strict session cookie
(see `app.web.auth`), accepted on the dashboard's routes only; `POST /dashboard/logout` drops it.
Failed sign-ins are throttled per client address (429 with Retry-After)."""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.types import Scope

from app.errors import RateLimited, Unauthorized
from app.web.auth import REALM, SESSION_COOKIE, Authenticator
from app.web.context import read_body

router = APIRouter()
TEMPLATE = (Path(__file__).resolve().parent / "static" / "login.html").read_text(encoding="utf-8")
MAX_FORM_BYTES = 4096
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def sign_in_page(scope: Scope, message: str, status: int) -> Response:
    """The sign-in form; `message` is one of ours, never user input."""
    action = f"{scope.get('root_path', '')}/dashboard/login"
    html = TEMPLATE.replace("__ACTION__", action).replace("__MESSAGE__", message)
    return HTMLResponse(html, status_code=status, headers=PAGE_HEADERS)


def _to_dashboard(request: Request) -> RedirectResponse:
    return RedirectResponse(f"{request.scope.get('root_path', '')}/dashboard", status_code=303)


def _cookie_scope(request: Request) -> tuple[str, bool]:
    """The cookie's path (the dashboard's routes only) and whether it is `Secure` (HTTPS)."""
    https = request.url.scheme == "https" or request.headers.get("x-forwarded-proto") == "https"
    return f"{request.scope.get('root_path', '')}/dashboard", https


@router.get("/dashboard/login", include_in_schema=False)
async def login_form(request: Request) -> Response:
    if not Authenticator.of(request).dashboard_keyed:
        return _to_dashboard(request)
    return sign_in_page(request.scope, "", 200)


@router.post("/dashboard/login", include_in_schema=False)
async def login(request: Request) -> Response:
    authenticator = Authenticator.of(request)
    if not authenticator.dashboard_keyed:
        return _to_dashboard(request)
    client = request.client.host if request.client else ""
    wait_s = authenticator.sign_ins.retry_after(client)
    if wait_s is not None:
        page = sign_in_page(request.scope, "Too many failed sign-ins; try again later.", 429)
        page.headers["Retry-After"] = str(math.ceil(wait_s))
        page.headers["X-SIE-Error-Code"] = RateLimited.code
        return page
    form = parse_qs((await read_body(request, MAX_FORM_BYTES)).decode("utf-8", "replace"))
    key = (form.get("key") or [""])[0].strip()
    if not authenticator.key_accepted_for_dashboard(key):
        authenticator.sign_ins.failed(client)
        page = sign_in_page(request.scope, "That key is not valid here.", 401)
        page.headers["WWW-Authenticate"] = f'{REALM}, error="invalid_token"'
        page.headers["X-SIE-Error-Code"] = Unauthorized.code
        return page
    authenticator.sign_ins.succeeded(client)
    path, secure = _cookie_scope(request)
    response = _to_dashboard(request)
    response.set_cookie(
        SESSION_COOKIE,
        authenticator.session_cookie(key),
        max_age=authenticator.security.dashboard_session_seconds,
        path=path,
        secure=secure,
        httponly=True,
        samesite="strict",
    )
    return response


@router.post("/dashboard/logout", include_in_schema=False)
async def logout(request: Request) -> Response:
    path, secure = _cookie_scope(request)
    response = _to_dashboard(request)
    response.delete_cookie(
        SESSION_COOKIE, path=path, secure=secure, httponly=True, samesite="strict"
    )
    return response
