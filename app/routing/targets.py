"""Which worker group may serve a request, decided from the registry's snapshot: the pool
(`X-SIE-Pool`, default: the default pool), the profile (`X-SIE-MACHINE-PROFILE` or the model's
profiles, restricted to the pool's), and the live workers of that pool and profile with the
model loaded. Pure: the caller passes the workers, the pools and the time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.config import AppConfig
from app.errors import (
    InputTooLong,
    InvalidRequest,
    ModelLoadFailed,
    ModelLoading,
    PoolNotFound,
    Provisioning,
    ServiceError,
)
from app.pools.model import DEFAULT_POOL, PoolExpired, PoolRecord, normalize_name
from app.protocol.generation import GenerationRequest
from app.protocol.workers import EngineStats, WorkerStatus


@dataclass(frozen=True, slots=True)
class Target:
    pool: str
    profile: str
    deployment: str
    ready_workers: tuple[str, ...]


def live_workers(
    workers: Sequence[WorkerStatus], now: float, stale_seconds: float
) -> list[WorkerStatus]:
    return [worker for worker in workers if now - worker.reported_at <= stale_seconds]


def carry_over(
    previous: Sequence[WorkerStatus], current: Sequence[WorkerStatus], now: float, keep_s: float
) -> list[WorkerStatus]:
    """The registry's new snapshot, plus the workers of the previous one it lacks that
    reported within `keep_s`: a registry that just restarted (a redeploy) knows no worker until
    their next heartbeat, and the service must not look empty meanwhile. A worker that really
    left is harmless to keep that long: the request router never routes to a replica Serve
    no longer runs."""
    known = {worker.worker_id for worker in current}
    kept = [
        worker
        for worker in previous
        if worker.worker_id not in known and now - worker.reported_at <= keep_s
    ]
    return [*current, *kept]


def request_pool(request: GenerationRequest) -> str:
    return normalize_name(request.pool) if request.pool else DEFAULT_POOL


def choose_target(
    config: AppConfig,
    workers: Sequence[WorkerStatus],
    request: GenerationRequest,
    now: float,
    pools: Mapping[str, PoolRecord] | None = None,
) -> Target:
    """The pool + profile + ready workers for `request`, or the retryable/terminal error that
    explains why not. `WorkerStatus.pool` is the worker's assignment."""
    pool = request_pool(request)
    record = None
    if pool != DEFAULT_POOL:
        record = (pools or {}).get(pool)
        if record is None:
            raise PoolNotFound(request.pool or pool)
        if record.state == "expired":
            raise PoolExpired(
                f"pool '{pool}' expired (its lease was not renewed); create it again",
                param="X-SIE-Pool",
            )
    worker_pool = pool
    if record is not None and record.spec.shared:
        worker_pool = record.spec.worker_pool
        queue = (pools or {}).get(worker_pool)
        if worker_pool != DEFAULT_POOL and (queue is None or queue.spec.shared):
            worker_pool = DEFAULT_POOL  # its queue pool is gone: the base capacity serves it
        if worker_pool != DEFAULT_POOL and queue is not None:
            record = queue
    model = config.model(request.model)
    assert model is not None, "the ingress resolves the model first"
    allowed = [p for p in model.profiles if record is None or record.spec.allows(p)]
    if request.machine_profile is not None:
        profile = request.machine_profile.strip().lower()
        if profile not in model.profiles:
            raise InvalidRequest(
                f"model '{model.id}' is not served on profile '{request.machine_profile}'",
                param="X-SIE-MACHINE-PROFILE",
            )
        if profile not in allowed:
            raise InvalidRequest(
                f"pool '{pool}' has no '{profile}' workers (its profiles: "
                f"{', '.join(record.spec.profiles()) if record else ''})",
                param="X-SIE-MACHINE-PROFILE",
            )
        candidates = [profile]
    else:
        candidates = allowed
        if not candidates:
            raise InvalidRequest(
                f"model '{model.id}' is not served on any profile of pool '{pool}'",
                param="X-SIE-Pool",
            )
    live = live_workers(workers, now, config.worker_stale_seconds)
    retry_after = config.pools.provisioning_retry_after_seconds
    refusals: list[ServiceError] = []
    for profile_name in candidates:
        profile_config = config.profile(profile_name)
        assert profile_config is not None
        group = [w for w in live if w.profile == profile_name and w.pool == worker_pool]
        loaded = {
            worker.worker_id: status.stats
            for worker in group
            if (status := worker.model_state(model.id)) is not None and status.state == "loaded"
        }
        if loaded:
            check_prompt_fits(request, [stats for stats in loaded.values() if stats is not None])
            return Target(pool, profile_name, profile_config.deployment_name, tuple(loaded))
        refusals.append(_why_not_ready(model.id, worker_pool, profile_name, group, retry_after))
    raise _most_hopeful(refusals)


def _why_not_ready(
    model: str, pool: str, profile: str, group: list[WorkerStatus], retry_after: float
) -> ServiceError:
    states = [status for worker in group if (status := worker.model_state(model)) is not None]
    if any(status.state == "loading" for status in states):
        return ModelLoading(f"model '{model}' is loading on profile '{profile}'")
    if states and all(status.state == "failed" for status in states):
        # the load error (an exception's text, paths) is in the worker's log and /health
        return ModelLoadFailed(
            f"model '{model}' failed to load on profile '{profile}'; the worker log has the cause",
            error_class="ENGINE",
        )
    where = f"pool '{pool}'" if pool != DEFAULT_POOL else "the default pool"
    return Provisioning(
        f"no worker of profile '{profile}' in {where} is ready yet; provisioning",
        param="X-SIE-MACHINE-PROFILE",
        retry_after_s=retry_after,
        extra={"pool": pool, "profile": profile},
    )


def _most_hopeful(refusals: list[ServiceError]) -> ServiceError:
    """Prefer a retryable answer (loading, provisioning) over a terminal one."""
    for kind in (ModelLoading, Provisioning):
        for refusal in refusals:
            if isinstance(refusal, kind):
                return refusal
    return refusals[0]


def check_prompt_fits(request: GenerationRequest, engines: Sequence[EngineStats]) -> None:
    """400 INPUT_TOO_LONG, before any tokenizing, for a prompt with more characters than its
    engine's context could hold (vLLM's own bound: `max_model_len` x the longest vocabulary
    entry; no token covers more characters). Tokenizing megabytes takes seconds of a worker's
    CPU that its other streams need; this costs a length."""
    chars = request.prompt_chars if request.openai is not None else len(request.prompt or "")
    bounds = [bound for stats in engines if (bound := stats.max_prompt_chars) is not None]
    if not chars or not bounds or chars <= max(bounds):
        return
    context = max(stats.max_model_len for stats in engines)
    raise InputTooLong(
        f"This model's maximum context length is {context} tokens; the prompt has {chars} "
        f"characters, more than the {max(bounds)} that {context} tokens can hold",
        param=_prompt_param(request),
    )


def _prompt_param(request: GenerationRequest) -> str:
    route = request.openai.route if request.openai is not None else None
    params = {"chat": "messages", "messages": "messages", "count_tokens": "messages"}
    return {**params, "responses": "input"}.get(route or "", "prompt")
