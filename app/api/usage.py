"""`GET /v1/usage`: what each pool, model and API key id used (requests, prompt, cached prompt
and completion tokens) and the worker-seconds each pool held, service-wide and exact, from the
TenantLedger. `since` (unix seconds or RFC 3339) limits it to a window, rounded down to the
minute; `pool` to one pool, a deleted one too while the ledger holds its usage. Needs an admin
key once admin keys are set."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request

from app.api.openapi import error_responses
from app.errors import InvalidRequest, PoolNotFound
from app.pools.model import DEFAULT_POOL, normalize_name
from app.web.context import ApiContext

router = APIRouter()


def parse_since(raw: str | None) -> float | None:
    """Unix seconds, or an RFC 3339 time with its offset (e.g. 2026-11-30T00:00:00Z)."""
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = _rfc3339(raw)
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest("since must be a time after 1970", param="since")
    return value


def _rfc3339(raw: str) -> float:
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(
            "since must be unix seconds or an RFC 3339 time (e.g. 2026-11-30T00:00:00Z)",
            param="since",
        ) from None
    if moment.tzinfo is None:
        raise InvalidRequest("since needs a time zone offset (e.g. Z)", param="since")
    return moment.timestamp()


@router.get("/v1/usage", responses=error_responses("sie", 400, 404))
async def usage(request: Request, since: str | None = None, pool: str | None = None) -> Any:
    context = ApiContext.of(request)
    start = parse_since(since)
    name = normalize_name(pool) if pool else None
    if name is not None and name != DEFAULT_POOL and await context.backend.get_pool(name) is None:
        # a deleted pool's invoice outlives it: 404 only when it never used anything
        ever: dict[str, Any] = await context.backend.usage_report(None, name)
        if not _used(ever, name):
            raise PoolNotFound(pool or name)
        if start is None:
            return ever
    report: dict[str, Any] = await context.backend.usage_report(start, name)
    return report


def _used(report: dict[str, Any], pool: str) -> bool:
    """The report counts a request or a worker-second of `pool`."""
    sums = report["pools"].get(pool, {})
    return bool(report["usage"]) or bool(sums.get("requests") or sums.get("worker_seconds"))
