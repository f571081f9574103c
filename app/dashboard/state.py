"""The dashboard's JSON feed: pools, workers, cluster totals, recent latency and throughput
(overall and per pool and model), autoscaler decisions and errors by code, from the same
snapshot `/health` and `/metrics` read. Request figures are the whole service's (every ingress
replica's, `metrics.SHARING.view()`)."""

from __future__ import annotations

import time
from typing import Any

from app import history, metrics
from app.pools.model import DEFAULT_POOL, PoolRecord
from app.protocol.workers import WorkerStatus
from app.web.context import ApiContext
from app.web.health import health_of
from app.web.snapshot import refresh_snapshot

RECENT_DECISIONS = 30


async def dashboard_state(context: ApiContext) -> dict[str, Any]:
    now = time.time()
    snapshot = await refresh_snapshot(context)
    workers: list[WorkerStatus] = snapshot["workers"]
    pools: list[PoolRecord] | None = snapshot["pools"]
    autoscaler: dict[str, Any] | None = snapshot["autoscaler"]
    view = metrics.SHARING.view(now)
    health = health_of(context.config, workers, now)
    entries = {entry.name: entry for entry in health.workers}
    worker_rows = [
        _worker_row(worker, entries[worker.worker_id].model_dump()) for worker in workers
    ]
    readiness = (autoscaler or {}).get("readiness", {})
    pool_rows = None
    if pools is not None:
        pool_rows = [_default_pool(context, workers)] + [
            _pool_row(record, workers, now, readiness.get(record.name)) for record in pools
        ]
    return {
        "now": now,
        "status": health.status,
        "profiles": [p.name for p in context.config.profiles],
        "models": [model.model_dump() for model in health.models],
        "cluster": _totals(worker_rows, pools),
        "pools": pool_rows,
        "workers": worker_rows,
        "latency": history.summary(view.steps, now),
        "series": history.series(view.steps, now),
        "targets": history.by_target(view.steps, now),
        "autoscaler": _autoscaler(autoscaler),
        "requests": _request_totals(view, now),
        "usage": _usage(snapshot.get("usage"), pools),
        "problems": snapshot["errors"],
    }


def _worker_row(worker: WorkerStatus, health: dict[str, Any]) -> dict[str, Any]:
    kv = metrics.kv_view(worker)
    return {
        "name": worker.worker_id,
        "profile": worker.profile,
        "node_id": worker.node_id,
        "pool": worker.pool,
        "state": health["state"],
        "healthy": health["healthy"],
        "loaded_models": worker.loaded_models,
        "models": [
            {"model": status.model, "state": status.state, "error": status.error}
            for status in worker.models
        ],
        "queue_depth": worker.active_requests,
        "memory_used_bytes": worker.memory_used_bytes,
        "reported_at": worker.reported_at,
        "kv": {
            "blocks_total": kv.blocks_total,
            "blocks_used": kv.blocks_used,
            "handles_open": kv.handles_open,
            "engine_usage": kv.engine_usage,
            "cached_blocks": health.get("kv_cached_blocks"),  # KV events: the prefix cache
        },
    }


def _assigned_by_profile(names: list[str], workers: list[WorkerStatus]) -> dict[str, int]:
    profiles = {worker.worker_id: worker.profile for worker in workers}
    counts: dict[str, int] = {}
    for name in names:
        profile = profiles.get(name, "unknown")
        counts[profile] = counts.get(profile, 0) + 1
    return counts


def _pool_row(
    record: PoolRecord, workers: list[WorkerStatus], now: float, readiness: str | None
) -> dict[str, Any]:
    spec = record.spec
    return {
        "name": record.name,
        "state": record.state,
        "default": False,
        "created_at": record.created_at,
        "expires_at": record.expires_at(),
        "expires_in_s": record.expires_at() - now,
        "lease_seconds": record.lease_seconds,
        "gpus": dict(spec.gpus),
        "gpu_caps": dict(spec.gpu_caps),
        "minimum_worker_count": spec.minimum_worker_count,
        "pinned_models": list(spec.pinned_models),
        "bundle": spec.bundle,
        "assigned": _assigned_by_profile(record.assigned_workers, workers),
        "assigned_workers": list(record.assigned_workers),
        "readiness": readiness,
    }


def _usage(
    report: dict[str, Any] | None, pools: list[PoolRecord] | None
) -> list[dict[str, Any]] | None:
    """One usage panel per pool (the default pool first): the TenantLedger's all-time totals
    and worker-seconds, the pool's limits and default priority, and its top key ids."""
    if report is None:
        return None
    specs = {record.name: record.spec for record in pools or []}
    names = [DEFAULT_POOL, *sorted((set(report.get("pools", {})) | set(specs)) - {DEFAULT_POOL})]
    rows = []
    for name in names:
        totals = report.get("pools", {}).get(name, {})
        keys: dict[str, int] = {}
        for row in report.get("usage", []):
            if row["pool"] == name:
                keys[row["key_id"]] = keys.get(row["key_id"], 0) + int(row["total_tokens"])
        spec = specs.get(name)
        rows.append(
            {
                "pool": name,
                "requests": totals.get("requests", 0),
                "prompt_tokens": totals.get("prompt_tokens", 0),
                "cached_prompt_tokens": totals.get("cached_prompt_tokens", 0),
                "completion_tokens": totals.get("completion_tokens", 0),
                "worker_seconds": totals.get("worker_seconds", 0.0),
                "limits": spec.limits.model_dump() if spec is not None else {},
                "priority": spec.priority if spec is not None else 0,
                "shared": spec.shared if spec is not None else False,
                "top_keys": sorted(keys.items(), key=lambda kv: -kv[1])[:3],
            }
        )
    return rows


def _default_pool(context: ApiContext, workers: list[WorkerStatus]) -> dict[str, Any]:
    """The base capacity, shown like a pool (no lease): workers no other pool holds."""
    names = [worker.worker_id for worker in workers if worker.pool == DEFAULT_POOL]
    profiles = context.config.profiles
    return {
        "name": DEFAULT_POOL,
        "state": "active",
        "default": True,
        "created_at": None,
        "expires_at": None,
        "expires_in_s": None,
        "lease_seconds": None,
        "gpus": {p.name: p.num_replicas for p in profiles},
        "gpu_caps": {p.name: p.max_replicas for p in profiles if p.max_replicas is not None},
        "minimum_worker_count": sum(p.num_replicas for p in profiles),
        "pinned_models": [],
        "bundle": None,
        "assigned": _assigned_by_profile(names, workers),
        "assigned_workers": names,
        "readiness": None,
    }


def _totals(rows: list[dict[str, Any]], pools: list[PoolRecord] | None) -> dict[str, Any]:
    used = [row["kv"]["blocks_used"] for row in rows if row["kv"]["blocks_used"] is not None]
    handles = [row["kv"]["handles_open"] for row in rows if row["kv"]["handles_open"] is not None]
    return {
        "workers": len(rows),
        "workers_ready": sum(1 for row in rows if row["state"] == "ready"),
        "workers_by_state": _count(row["state"] for row in rows),
        "active_requests": sum(row["queue_depth"] for row in rows),
        "kv_blocks_total": sum(row["kv"]["blocks_total"] for row in rows),
        "kv_blocks_used": sum(used) if used else None,
        "kv_handles_open": sum(handles) if handles else None,
        "pools_by_state": None if pools is None else _count(p.state for p in pools),
    }


def _count(values: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _autoscaler(status: dict[str, Any] | None) -> dict[str, Any] | None:
    if status is None:
        return None
    return {
        "decisions": collapse_repeats(list(status.get("reasons", [])))[:RECENT_DECISIONS],
        "scale_events": list(status.get("scale_events", []))[-10:][::-1],
        "replicas": status.get("replicas", {}),
        "capacity": status.get("capacity", {}),
        "scaler_error": status.get("scaler_error"),
    }


def collapse_repeats(reasons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Newest first; a reason repeated step after step (e.g. a target Serve keeps refusing)
    becomes one entry with `repeats` and `first_at`."""
    collapsed: list[dict[str, Any]] = []
    latest: dict[str, dict[str, Any]] = {}
    for entry in reversed(reasons):
        reason = str(entry.get("reason", ""))
        seen = latest.get(reason)
        if seen is not None and seen is collapsed[-1]:
            seen["repeats"] += 1
            seen["first_at"] = entry.get("at")
            continue
        row = {
            "at": entry.get("at"),
            "first_at": entry.get("at"),
            "reason": reason,
            "kind": str(entry.get("kind", "other")),
            "repeats": 1,
        }
        collapsed.append(row)
        latest[reason] = row
    return collapsed


def _request_totals(view: metrics.Shard, now: float) -> dict[str, Any]:
    """Requests and errors by code since counting began (every ingress replica's), errors in
    the last span, and the replicas counted."""
    total = 0.0
    errors: dict[str, float] = {}
    code_at = metrics.REQUESTS.labels.index("code")
    for key, value in view.sums.get(metrics.REQUESTS.name, {}).items():
        total += value
        if key[code_at] != metrics.NO_CODE:
            errors[key[code_at]] = errors.get(key[code_at], 0.0) + value
    return {
        "total": int(total),
        "errors_by_code": {code: int(count) for code, count in sorted(errors.items())},
        "recent_errors_by_code": history.recent_errors(view.steps, now),
        "recent_span_s": history.SPAN_S,
        "client_disconnects": int(metrics.total(metrics.CLIENT_DISCONNECTS, view)),
        "cancellations": int(metrics.total(metrics.CANCELLATIONS, view)),
        "streams_in_flight": int(metrics.total(metrics.STREAMS_IN_FLIGHT, view)),
        "ingress_replicas": view.sources,
    }
