"""`ApiKeyMiddleware`: the API-key check of `app.web.auth` in front of every route (pure ASGI),
answering 401/403 in the route's error shape; and the id of the key a request came with."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.errors import ErrorShape, error_response
from app.errors import Forbidden
from app.tenancy.keys import NO_KEY, key_id
from app.web.auth import (
    READ_METHODS,
    REALM,
    SESSION_COOKIE,
    Authenticator,
    bearer_token,
    cookie_value,
    route_path,
    route_tier,
)

KEY_ID_STATE = "poolserve_key_id"


def request_key_id(request: Request) -> str:
    """The id of the API key the request was authenticated with ('none' without keys)."""
    state = request.scope.get("state") or {}
    return str(state.get(KEY_ID_STATE, NO_KEY))


class ApiKeyMiddleware:
    """Answers 401/403 (contract error shape, `X-SIE-Error-Code`, `WWW-Authenticate: Bearer`)
    before any route runs; the dashboard page itself answers with its sign-in form."""

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        shape_for: Callable[[str], ErrorShape],
        sign_in_page: Callable[[Scope, str, int], Response],
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.shape_for = shape_for
        self.sign_in_page = sign_in_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not self.authenticator.enabled:
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        method: str = scope.get("method", "GET")
        tier = route_tier(method, path, self.authenticator.security)
        headers = Headers(scope=scope)
        cookie = cookie_value(headers, SESSION_COOKIE) if tier == "dashboard" else None
        token = bearer_token(headers)
        error = self.authenticator.check(tier, token, cookie)
        if error is None:
            if token:  # a valid key: usage and limits count it by its id, never by the key
                scope.setdefault("state", {})[KEY_ID_STATE] = key_id(token)
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response: Response
        if tier == "dashboard" and method in READ_METHODS and path.rstrip("/") == "/dashboard":
            response = self.sign_in_page(scope, "", 401)
            response.headers["X-SIE-Error-Code"] = error.code
        else:
            response = error_response(error, self.shape_for(path))
        if isinstance(error, Forbidden):
            response.headers["WWW-Authenticate"] = f'{REALM}, error="insufficient_scope"'
        elif bearer_token(headers) is None:
            response.headers["WWW-Authenticate"] = REALM
        else:
            response.headers["WWW-Authenticate"] = f'{REALM}, error="invalid_token"'
        await response(scope, receive, send)
