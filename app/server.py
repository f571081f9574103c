"""The HTTP application: the API's and the dashboard's routers, one exception mapping, and
common response headers. It sits above `app/api` and `app/dashboard`, so the API needs no
dashboard import (the dashboard uses the API's auth and context)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from app.api import anthropic_routes, generate, models, observe, openai_routes, pools, usage
from app.api.auth import ApiKeyMiddleware
from app.api.errors import ErrorShape, error_response, format_location, validation_error
from app.config import AppConfig
from app.dashboard import login
from app.dashboard import routes as dashboard
from app.errors import InvalidRequest, MethodNotAllowed, RouteNotFound, ServiceError
from app.protocol.sie import SIE_API_VERSION
from app.web.auth import Authenticator, route_path
from app.web.backend import GenerationBackend
from app.web.context import ApiContext

OPENAI_PREFIXES = (
    "/v1/chat/",
    "/v1/completions",
    "/v1/responses",
    "/v1/models",
    "/tokenize",
    "/detokenize",
)


def shape_for(path: str) -> ErrorShape:
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    return "openai" if path.startswith(OPENAI_PREFIXES) else "sie"


def create_app(config: AppConfig, backend: GenerationBackend) -> FastAPI:
    app = FastAPI(title="poolserve", version=SIE_API_VERSION)
    app.state.context = ApiContext(config=config, backend=backend)
    app.state.authenticator = authenticator = Authenticator.from_config(config.security)
    for module in (openai_routes, generate, models, pools, usage, observe, dashboard, login):
        app.include_router(module.router)
    app.include_router(anthropic_routes.router)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return error_response(error, shape_for(route_path(request.scope)))

    @app.exception_handler(ValidationError)
    async def invalid_body(request: Request, error: ValidationError) -> JSONResponse:
        return error_response(validation_error(error), shape_for(route_path(request.scope)))

    @app.exception_handler(RequestValidationError)
    async def invalid_parameters(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(_request_validation(error), shape_for(route_path(request.scope)))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        mapped: ServiceError
        if error.status_code == 405:
            mapped = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
        elif error.status_code == 404:
            mapped = RouteNotFound(f"no route {request.method} {request.url.path}")
        else:
            mapped = ServiceError(str(error.detail))
            mapped.status = error.status_code
        response = error_response(mapped, shape_for(route_path(request.scope)))
        response.headers.update(error.headers or {})
        if error.status_code == 405:
            response.headers["Allow"] = allowed_methods(request)  # RFC 9110
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(error, shape_for(route_path(request.scope)))

    if authenticator.enabled:  # (without keys it would only pass every request on)
        app.add_middleware(
            ApiKeyMiddleware,
            authenticator=authenticator,
            shape_for=shape_for,
            sign_in_page=login.sign_in_page,
        )
    if config.security.cors_allow_origins:  # outside the key check: preflights carry no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.security.cors_allow_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=["X-SIE-Error-Code", "X-SIE-Request-ID", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(observe.RequestMetrics)  # outermost: it sees (and heads) every response
    return app


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette's own 405 names one route's)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def _request_validation(error: RequestValidationError) -> ServiceError:
    errors = error.errors()
    if not errors:
        return InvalidRequest("invalid request")
    first: dict[str, Any] = errors[0]
    param = format_location(first.get("loc", ())[1:])
    return InvalidRequest(f"{param}: {first.get('msg', 'invalid value')}", param=param or None)
