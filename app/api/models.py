"""`GET /health` (SIE gateway shape, plus each worker's pool, node, state and memory and the
pools with their state and workers), `GET /v1/models` (OpenAI `data` + SIE `models`) and
`GET /v1/models/{id}` (ids keep their slashes)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from app.api.openapi import error_responses
from app.config import ModelConfig
from app.errors import ModelNotFound
from app.pools.model import pool_list_item
from app.protocol.sie import HealthModel, HealthResponse
from app.web.context import ApiContext
from app.web.health import health_of

router = APIRouter()
CREATED_AT = int(time.time())


def tools_supported(model: ModelConfig) -> bool:
    """Requests with `tools` default to `tool_choice: auto`, which vLLM serves only with
    `enable_auto_tool_choice` and a `tool_call_parser` in the model's `openai` settings."""
    return bool(
        model.openai.get("enable_auto_tool_choice") and model.openai.get("tool_call_parser")
    )


def model_info(model: ModelConfig, summary: HealthModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": CREATED_AT,
        "owned_by": "poolserve",
        "name": model.id,
        "loaded": summary.state == "loaded",
        "state": summary.state,
        "inputs": ["text"],
        "outputs": ["tokens"],
        "max_sequence_length": model.engine.max_model_len,
        "profiles": {name: {"is_default": index == 0} for index, name in enumerate(model.profiles)},
        "capabilities": {
            "streaming": True,
            "grammar": ["json_schema", "regex", "ebnf"],
            "tools": tools_supported(model),
            "lora_adapters": sorted(model.lora_adapters),
        },
        "worker_count": summary.worker_count,
    }


async def _health(request: Request) -> tuple[ApiContext, HealthResponse]:
    context = ApiContext.of(request)
    return context, health_of(context.config, await context.backend.workers(), time.time())


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    context = ApiContext.of(request)
    workers = await context.backend.workers()
    body = health_of(context.config, workers, time.time()).model_dump()
    memory = {worker.worker_id: worker.memory_used_bytes for worker in workers}
    for entry in body["workers"]:
        entry["memory_used_bytes"] = memory.get(entry["name"], 0)
    body["pools"] = [
        {**pool_list_item(record), "assigned_workers": list(record.assigned_workers)}
        for record in await context.backend.list_pools()
    ]
    limits = context.backend.limits_health()
    if limits is not None:
        body["limits"] = limits  # how this replica decides limits now (leased or fallback)
    return body


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    context, report = await _health(request)
    summaries = {summary.name: summary for summary in report.models}
    infos = [model_info(model, summaries[model.id]) for model in context.config.models]
    return {"object": "list", "data": infos, "models": infos}


@router.get("/v1/models/{model_id:path}", responses=error_responses("openai", 404))
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    context, report = await _health(request)
    model = context.config.model(model_id)
    if model is None:
        raise ModelNotFound(model_id)
    summary = next(summary for summary in report.models if summary.name == model.id)
    return model_info(model, summary)
