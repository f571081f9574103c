"""Which worker group may serve a request, decided from the registry's snapshot: the profile
(from `X-SIE-MACHINE-PROFILE` or the model's profiles), and whether any live worker there has
the model loaded. Pure: the caller passes the workers and the time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from app.config import AppConfig
from app.errors import (
    InvalidRequest,
    ModelLoadFailed,
    ModelLoading,
    PoolNotFound,
    Provisioning,
    ServiceError,
)
from app.protocol.generation import GenerationRequest
from app.protocol.workers import WorkerStatus

DEFAULT_POOL = "default"


@dataclass(frozen=True, slots=True)
class Target:
    profile: str
    deployment: str
    ready_workers: tuple[str, ...]


def live_workers(
    workers: Sequence[WorkerStatus], now: float, stale_seconds: float
) -> list[WorkerStatus]:
    return [worker for worker in workers if now - worker.reported_at <= stale_seconds]


def choose_target(
    config: AppConfig, workers: Sequence[WorkerStatus], request: GenerationRequest, now: float
) -> Target:
    """The profile to send `request` to, or the retryable/terminal error that explains why not."""
    if request.pool not in (None, DEFAULT_POOL):
        raise PoolNotFound(request.pool)
    model = config.model(request.model)
    assert model is not None, "the ingress resolves the model first"
    if request.machine_profile is not None:
        if request.machine_profile not in model.profiles:
            raise InvalidRequest(
                f"model '{model.id}' is not served on profile '{request.machine_profile}'",
                param="X-SIE-MACHINE-PROFILE",
            )
        candidates = [request.machine_profile]
    else:
        candidates = list(model.profiles)
    live = live_workers(workers, now, config.worker_stale_seconds)
    refusals: list[ServiceError] = []
    for profile_name in candidates:
        profile = config.profile(profile_name)
        assert profile is not None
        group = [worker for worker in live if worker.profile == profile_name]
        ready = tuple(
            worker.worker_id
            for worker in group
            if (status := worker.model_state(model.id)) is not None and status.state == "loaded"
        )
        if ready:
            return Target(profile_name, profile.deployment_name, ready)
        refusals.append(_why_not_ready(model.id, profile_name, group))
    raise _most_hopeful(refusals)


def _why_not_ready(model: str, profile: str, group: list[WorkerStatus]) -> ServiceError:
    states = [status for worker in group if (status := worker.model_state(model)) is not None]
    if any(status.state == "loading" for status in states):
        return ModelLoading(f"model '{model}' is loading on profile '{profile}'")
    if states and all(status.state == "failed" for status in states):
        return ModelLoadFailed(states[0].error or "model failed to load", error_class="ENGINE")
    return Provisioning(
        f"no worker of profile '{profile}' is ready yet", param="X-SIE-MACHINE-PROFILE"
    )


def _most_hopeful(refusals: list[ServiceError]) -> ServiceError:
    """Prefer a retryable answer (loading, provisioning) over a terminal one."""
    for kind in (ModelLoading, Provisioning):
        for refusal in refusals:
            if isinstance(refusal, kind):
                return refusal
    return refusals[0]
