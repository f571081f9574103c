"""SIE pool routes: `POST /v1/pools` (create, or update + renew), `GET /v1/pools`,
`GET|DELETE /v1/pools/{name}`, `POST /v1/pools/{name}/renew`. Names are case-insensitive.
Errors render as `{"detail": {"message", "code", ...}}` (the shape the sie-sdk parses; see
`app.server.shape_for`). Bodyless calls are accepted whatever their Content-Type (the SDK
sends `application/msgpack` on them)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request

from app.api.body import read_json
from app.api.openapi import error_responses, json_body
from app.errors import InvalidRequest, PoolNotFound
from app.pools.model import (
    DEFAULT_POOL,
    PoolRecord,
    PoolRequest,
    normalize_name,
    pool_body,
    pool_list_item,
    spec_from_request,
)
from app.web.context import ApiContext

router = APIRouter()
logger = logging.getLogger(__name__)


async def _body(context: ApiContext, record: PoolRecord) -> dict[str, Any]:
    workers = await context.backend.workers()
    urls = {w.worker_id: (f"serve://{w.deployment}/{w.worker_id}", w.profile) for w in workers}
    body = pool_body(record, urls)
    body["status"]["usage"] = await _usage(context, record.name)
    return body


async def _usage(context: ApiContext, pool: str) -> dict[str, Any] | None:
    """The pool's usage from the TenantLedger; None (logged) when it cannot be read right now,
    so reading a pool never fails on its accounting."""
    try:
        return await context.backend.pool_usage(pool)
    except Exception:
        logger.warning("usage of pool %s unavailable", pool, exc_info=True)
        return None


async def _default_pool(context: ApiContext) -> dict[str, Any]:
    """The base capacity, shown like a pool: every worker not assigned to another pool."""
    workers = [w for w in await context.backend.workers() if w.pool == DEFAULT_POOL]
    return {
        "name": DEFAULT_POOL,
        "spec": {
            "name": DEFAULT_POOL,
            "queue_pool": DEFAULT_POOL,
            "gpus": {p.name: p.num_replicas for p in context.config.profiles},
            "gpu_caps": {
                p.name: p.max_replicas
                for p in context.config.profiles
                if p.max_replicas is not None
            },
            "bundle": None,
            "minimum_worker_count": sum(p.num_replicas for p in context.config.profiles),
            "pinned_models": [],
        },
        "status": {
            "state": "active",
            "assigned_workers": [
                {
                    "name": w.worker_id,
                    "url": f"serve://{w.deployment}/{w.worker_id}",
                    "gpu": w.profile,
                    "bundle": "",
                }
                for w in workers
            ],
            "usage": await _usage(context, DEFAULT_POOL),
        },
    }


@router.post(
    "/v1/pools",
    openapi_extra=json_body(PoolRequest),
    responses=error_responses("sie", 400, 413, 415),
)
async def create_pool(request: Request) -> dict[str, Any]:
    context = ApiContext.of(request)
    spec = spec_from_request(
        PoolRequest.model_validate(await read_json(request, context)), context.config
    )
    return await _body(context, await context.backend.create_pool(spec))


@router.get("/v1/pools")
async def list_pools(request: Request) -> dict[str, Any]:
    context = ApiContext.of(request)
    records = await context.backend.list_pools()
    return {"pools": [pool_list_item(record) for record in records]}


@router.get("/v1/pools/{name}", responses=error_responses("sie", 404))
async def get_pool(name: str, request: Request) -> dict[str, Any]:
    context = ApiContext.of(request)
    if normalize_name(name) == DEFAULT_POOL:
        return await _default_pool(context)
    record = await context.backend.get_pool(name)
    if record is None:
        raise PoolNotFound(name)
    return await _body(context, record)


@router.delete("/v1/pools/{name}", responses=error_responses("sie", 400, 404))
async def delete_pool(name: str, request: Request) -> dict[str, Any]:
    context = ApiContext.of(request)
    if normalize_name(name) == DEFAULT_POOL:
        raise InvalidRequest("the 'default' pool is the base capacity and cannot be deleted")
    if not await context.backend.delete_pool(name):
        raise PoolNotFound(name)
    return {"name": normalize_name(name), "deleted": True}


@router.post("/v1/pools/{name}/renew", responses=error_responses("sie", 404, 410))
async def renew_pool(name: str, request: Request) -> dict[str, Any]:
    context = ApiContext.of(request)
    if normalize_name(name) == DEFAULT_POOL:
        return await _default_pool(context)
    return await _body(context, await context.backend.renew_pool(name))
