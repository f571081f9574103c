"""/health's view of the workers and models (the SIE gateway shape), shared by `GET /health`,
`/v1/models` and the dashboard."""

from __future__ import annotations

import math
from typing import Any

from app.config import AppConfig, ModelConfig
from app.protocol.sie import HealthCluster, HealthModel, HealthResponse, HealthWorker
from app.protocol.workers import WorkerStatus


def kv_fields(worker: WorkerStatus) -> dict[str, Any]:
    """The KV ledger's numbers for a worker, summed over its loaded engines."""
    stats = [status.stats for status in worker.models if status.stats is not None]
    return {
        "kv_blocks_total": sum(s.kv_blocks_total for s in stats),
        "kv_blocks_used": sum(s.kv_blocks_used for s in stats),
        "kv_handles_open": sum(s.kv_handles_open for s in stats),
        "kv_waiting": sum(s.kv_waiting for s in stats),
        "kv_engine_usage": max((s.kv_usage_fraction for s in stats), default=0.0),
        "engine_preemptions": sum(s.preemptions for s in stats),
        "engine_prompt_tokens": sum(s.prompt_tokens_total for s in stats),
        "engine_generation_tokens": sum(s.generation_tokens_total for s in stats),
        # blocks the engines' prefix caches hold, from their KV events (None: events off)
        "kv_cached_blocks": sum(cached)
        if (cached := [s.kv_cached_blocks for s in stats if s.kv_cached_blocks is not None])
        else None,
    }


def gpus_of(config: AppConfig, profile_name: str) -> int:
    """The GPUs a worker of this profile holds (its `num_gpus`, a fraction counting as one);
    0 for a CPU worker."""
    profile = config.profile(profile_name)
    return math.ceil(profile.num_gpus) if profile is not None else 0


def health_of(config: AppConfig, workers: list[WorkerStatus], now: float) -> HealthResponse:
    entries = []
    for worker in workers:
        live = now - worker.reported_at <= config.worker_stale_seconds
        failed = any(status.state == "failed" for status in worker.models)
        loading = any(status.state == "loading" for status in worker.models)
        healthy = live and not failed
        entries.append(
            HealthWorker(
                name=worker.worker_id,
                url=f"serve://{worker.deployment}/{worker.worker_id}",
                gpu=worker.profile,
                gpu_count=gpus_of(config, worker.profile),
                ready_gpu_slots=1 if healthy and not loading else 0,
                healthy=healthy,
                queue_depth=worker.active_requests,
                loaded_models=worker.loaded_models,
                pool=worker.pool,
                node_id=worker.node_id,
                **kv_fields(worker),
                state="stale"
                if not live
                else "failed"
                if failed
                else "loading"
                if loading
                else "ready",
            )
        )
    healthy_count = sum(entry.healthy for entry in entries)
    if not entries:
        status = "no_workers"
    elif healthy_count == len(entries):
        status = "healthy"
    else:
        status = "degraded"
    models = [_model_summary(model, workers, entries) for model in config.models]
    return HealthResponse(
        status=status,
        cluster=HealthCluster(
            worker_count=len(entries),
            gpu_count=sum(entry.gpu_count for entry in entries),
            models_loaded=sum(1 for model in models if model.state == "loaded"),
        ),
        configured_gpu_types=[profile.name for profile in config.profiles],
        live_gpu_types=sorted({entry.gpu for entry in entries if entry.healthy}),
        workers=entries,
        models=models,
    )


def _model_summary(
    model: ModelConfig, workers: list[WorkerStatus], entries: list[HealthWorker]
) -> HealthModel:
    healthy = {entry.name for entry in entries if entry.healthy}
    states = [
        (worker, status)
        for worker in workers
        if (status := worker.model_state(model.id)) is not None
    ]
    serving = [
        worker
        for worker, status in states
        if status.state == "loaded" and worker.worker_id in healthy
    ]
    if serving:
        state = "loaded"
    elif any(status.state == "loading" for _, status in states):
        state = "loading"
    elif states and all(status.state == "failed" for _, status in states):
        state = "failed"
    else:
        state = "available"
    return HealthModel(
        name=model.id,
        state=state,
        worker_count=len(serving),
        gpu_types=sorted({worker.profile for worker in serving}),
        total_queue_depth=sum(worker.active_requests for worker in serving),
    )
