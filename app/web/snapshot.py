"""One read of the backend's snapshot (workers, pools, autoscaler status, usage) for `/metrics`
and the dashboard feed, moving the Prometheus gauges to it on the way, and of the other ingress
replicas' request metrics (`metrics.SHARING.exchange`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from app import metrics
from app.web.context import ApiContext
from app.web.kv_metrics import update_kv_events


async def refresh_snapshot(context: ApiContext) -> dict[str, Any]:
    """Move the worker/KV/pool/autoscaler gauges to the backend's current snapshot; returns what
    it read (workers, pools, autoscaler status) and what could not be read (`errors`)."""
    errors: dict[str, str] = {}
    exchange = asyncio.ensure_future(metrics.SHARING.exchange())  # meanwhile: one call
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
    if pool_states is not None:
        metrics.note_pools(pool_states)
    metrics.update_snapshot(workers, pool_states, time.time(), context.config.worker_stale_seconds)
    update_kv_events(workers)
    await exchange
    return {
        "workers": workers,
        "pools": pools,
        "autoscaler": status,
        "usage": usage,
        "errors": errors,
    }
