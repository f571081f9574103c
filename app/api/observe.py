"""`GET /metrics` (Prometheus text) and `RequestMetrics`, the pure ASGI middleware that counts
every HTTP request by route template, status and error code and notices client disconnects
(streaming bodies pass through untouched)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import metrics
from app.api.context import ApiContext
from app.errors import InternalError

router = APIRouter()
logger = logging.getLogger(__name__)


def instrument(app: FastAPI) -> FastAPI:
    """Add the request metrics middleware (outermost: it sees every response)."""
    app.add_middleware(RequestMetrics)
    return app


async def refresh_snapshot(context: ApiContext) -> dict[str, Any]:
    """Move the worker/KV/pool/autoscaler gauges to the backend's current snapshot; returns what
    it read (workers, pools, autoscaler status) and what could not be read (`errors`)."""
    errors: dict[str, str] = {}
    workers = await context.backend.workers()
    pools = None
    try:
        pools = await context.backend.list_pools()
    except Exception as error:  # noqa: BLE001 - reported on the dashboard, not raised
        errors["pools"] = f"{type(error).__name__}: {error}"
    status = None
    status_of = getattr(context.backend, "autoscaler_status", None)
    if status_of is None:
        errors["autoscaler"] = "this backend does not expose the pool autoscaler's decisions"
    else:
        try:
            status = await status_of()
            metrics.TALLY.update(status)
        except Exception as error:  # noqa: BLE001
            errors["autoscaler"] = f"{type(error).__name__}: {error}"
    usage = None
    usage_of = getattr(context.backend, "usage_report", None)
    if usage_of is not None:
        try:
            usage = await usage_of(None, None)
            metrics.USAGE.update(usage)
        except Exception as error:  # noqa: BLE001
            errors["usage"] = f"{type(error).__name__}: {error}"
    pool_states = None if pools is None else {p.name: p.state for p in pools}
    metrics.update_snapshot(workers, pool_states, time.time(), context.config.worker_stale_seconds)
    return {
        "workers": workers,
        "pools": pools,
        "autoscaler": status,
        "usage": usage,
        "errors": errors,
    }


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics(request: Request) -> Response:
    await refresh_snapshot(ApiContext.of(request))
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
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
                for name, value in message.get("headers", []):
                    if name.lower() == b"x-sie-error-code":
                        code = value.decode("latin-1")
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
            )
