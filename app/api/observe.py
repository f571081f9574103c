"""`GET /metrics` (Prometheus text); `RequestMetrics`, the app's one pure ASGI middleware at its
edge: it heads every response (`X-SIE-Server-Version`, `X-SIE-Request-ID`), counts every HTTP
request by route template, status, error code, pool and model and notices client disconnects
(streaming bodies pass through untouched); and `instrument`, which labels generations with their
pool and model and shares the replica's metrics while the app runs (`app.metrics.SHARING`)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.errors import InternalError
from app.protocol.generation import GenerationRequest
from app.protocol.sie import SIE_API_VERSION
from app.web.backend import GenerationBackend
from app.web.context import ApiContext
from app.web.snapshot import refresh_snapshot

router = APIRouter()
SERVER_VERSION = SIE_API_VERSION.encode()
logger = logging.getLogger(__name__)


def instrument(app: FastAPI) -> FastAPI:
    """Label each generation's metrics with its pool and model (`ObservedBackend`), and, while
    the app runs, publish this replica's metrics if `metrics.SHARING` is connected to a share
    (the last counts once more as the app stops)."""
    context: ApiContext = app.state.context
    if not isinstance(context.backend, ObservedBackend):
        app.state.context = dataclasses.replace(context, backend=ObservedBackend(context.backend))
    app.router.lifespan_context = _sharing(app.router.lifespan_context)
    return app


def _sharing(
    inner: Callable[[Any], AbstractAsyncContextManager[Any]],
) -> Callable[[Any], AbstractAsyncContextManager[Any]]:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as state:
            metrics.SHARING.start()
            try:
                yield state
            finally:
                await metrics.SHARING.stop()

    return lifespan


class ObservedBackend:
    """The app's backend, passed through: a generation it starts labels the metrics of the
    request being observed with its pool and model (`metrics.observe_generation`)."""

    def __init__(self, backend: GenerationBackend) -> None:
        self.backend = backend

    def stream(self, request: GenerationRequest) -> AsyncIterator[Any]:
        metrics.observe_generation(request)
        return self.backend.stream(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(request: Request) -> Response:
    await refresh_snapshot(ApiContext.of(request))
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """The app's outermost middleware, one layer for every response: adds
    `X-SIE-Server-Version`, and `X-SIE-Request-ID` where a response has none yet (errors
    raised before a generation got its id); counts the request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        observation = metrics.RequestObservation(scope)
        token = metrics.CURRENT_REQUEST.set(observation)
        status = 0
        code: str | None = None
        complete = False
        disconnected = False

        async def watch_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                disconnected = True
            return message

        async def watch_send(message: Message) -> None:
            nonlocal status, code, complete, disconnected
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers", []))
                identified = False
                for name, value in headers:
                    lowered = name.lower()
                    if lowered == b"x-sie-error-code":
                        code = value.decode("latin-1")
                    elif lowered == b"x-sie-request-id":
                        identified = True
                headers.append((b"x-sie-server-version", SERVER_VERSION))
                if not identified:
                    headers.append((b"x-sie-request-id", uuid.uuid4().hex.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            try:
                await send(message)
            except OSError:
                disconnected = True
                raise

        try:
            await self.app(scope, watch_receive, watch_send)
        except (asyncio.CancelledError, OSError, ClientDisconnect):
            disconnected = True
            raise
        except Exception:
            code = code or InternalError.code  # rendered by Starlette's outermost handler
            raise
        finally:
            metrics.CURRENT_REQUEST.reset(token)
            route = observation.route
            if disconnected and not complete:
                metrics.record_disconnect(route)
            metrics.record_request(
                route,
                scope.get("method", ""),
                status or (499 if disconnected else 500),
                code or observation.stream_error_code,
                observation,
            )
