"""SIE pools: the spec a client asks for, the record the autoscaler keeps (state, lease,
assigned workers), and validation of a create/update body against the config. Pure: every
time is passed in."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.config import AppConfig, Limits
from app.errors import InvalidRequest, ServiceError

DEFAULT_POOL = "default"
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1
PoolState = Literal["pending", "active", "expired"]
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class PoolExpired(ServiceError):
    """A request named a pool whose lease lapsed (renew or re-create it)."""

    status = 410
    code = "POOL_EXPIRED"


class PoolRequest(BaseModel):
    """The body of `POST /v1/pools` exactly as the sie-sdk sends it (absent keys are omitted)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    gpus: dict[str, int] | None = None
    gpu_caps: dict[str, int] | None = None
    queue_pool: str | None = None
    bundle: str | None = None
    minimum_worker_count: int | None = Field(None, ge=0)
    pinned_models: list[str] | None = None
    # tenancy (poolserve's own, optional: the sie-sdk never sends them)
    requests_per_minute: int | None = Field(None, gt=0)
    tokens_per_minute: int | None = Field(None, gt=0)
    concurrent_streams: int | None = Field(None, gt=0)
    priority: int | None = Field(None, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    shared: bool | None = None
    share_by_key: bool | None = None


class PoolSpec(BaseModel):
    """What a pool asks for. Profile names are lower-case; every count is >= 0."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    queue_pool: str = DEFAULT_POOL
    gpus: dict[str, int] = Field(default_factory=dict)
    gpu_caps: dict[str, int] = Field(default_factory=dict)
    bundle: str | None = None
    minimum_worker_count: int = 0
    pinned_models: tuple[str, ...] = ()
    limits: Limits = Field(default_factory=Limits)
    priority: int = 0
    """Default request priority (vLLM's semantics: lower is served earlier)."""
    shared: bool = False
    """Holds no workers: its requests run on the workers of `queue_pool`, which it shares with
    the other pools there in proportion to `gpus` (its `weight`)."""
    share_by_key: bool = False
    """Its part of an engine's batch is split equally among its active API keys
    (`kv.fair_share_batch_requests`), so one key's backlog does not crowd its other keys out."""

    @property
    def weight(self) -> float:
        """Fair-share weight at admission: the GPUs it asks for (at least 1)."""
        return float(max(1, sum(self.gpus.values())))

    @property
    def worker_pool(self) -> str:
        """The pool whose workers serve this pool's requests."""
        return self.queue_pool if self.shared else self.name

    def profiles(self) -> list[str]:
        """The profiles this pool names (readiness or caps); empty: any profile."""
        return sorted(set(self.gpus) | set(self.gpu_caps))

    def allows(self, profile: str) -> bool:
        return not self.profiles() or profile in self.profiles()

    def cap(self, profile: str) -> int | None:
        """Most workers of `profile` this pool may hold (None: bounded by the cluster only)."""
        if not self.allows(profile):
            return 0
        return self.gpu_caps.get(profile)

    def pinned_for(self, profile: str) -> list[str]:
        """Pinned model ids that apply on `profile` ('model:profile' pins one profile only)."""
        models = []
        for pinned in self.pinned_models:
            model, _, only = pinned.partition(":")
            if not only or only == profile:
                models.append(model)
        return models


class PoolRecord(BaseModel):
    """A pool as the autoscaler keeps it; `assigned_workers` are worker (replica) ids."""

    model_config = ConfigDict(extra="forbid")

    spec: PoolSpec
    state: PoolState = "pending"
    created_at: float
    last_renewed: float
    lease_seconds: float
    assigned_workers: list[str] = Field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    def expires_at(self) -> float:
        return self.last_renewed + self.lease_seconds

    def lapsed(self, now: float) -> bool:
        return now >= self.expires_at()


def normalize_name(name: str) -> str:
    """Pool names are case-insensitive and stored lower-case."""
    return name.strip().lower()


def spec_from_request(request: PoolRequest, config: AppConfig) -> PoolSpec:
    """Validate a create/update body against the configured profiles and models."""
    name = normalize_name(request.name)
    if not NAME_PATTERN.match(name):
        raise InvalidRequest(
            f"pool name '{request.name}' must be 1-63 characters of a-z, 0-9, '.', '_', '-' "
            "starting with a letter or digit",
            param="name",
        )
    if name == DEFAULT_POOL:
        raise InvalidRequest("the 'default' pool is the base capacity and cannot be changed")
    gpus = _profile_counts(request.gpus, config, "gpus")
    caps = _profile_counts(request.gpu_caps, config, "gpu_caps")
    for profile, count in gpus.items():
        cap = caps.get(profile)
        if cap is not None and count > cap:
            raise InvalidRequest(
                f"gpus[{profile}]={count} exceeds gpu_caps[{profile}]={cap}", param="gpus"
            )
    minimum = request.minimum_worker_count or 0
    profiles = sorted(set(gpus) | set(caps))
    if profiles and all(p in caps for p in profiles) and minimum > sum(caps.values()):
        raise InvalidRequest(
            f"minimum_worker_count={minimum} exceeds the sum of gpu_caps ({sum(caps.values())})",
            param="minimum_worker_count",
        )
    pinned = tuple(_pinned(model, config) for model in request.pinned_models or [])
    queue_pool = normalize_name(request.queue_pool or DEFAULT_POOL)
    if request.shared and queue_pool == name:
        raise InvalidRequest("a shared pool needs another pool's workers", param="queue_pool")
    if request.shared and (caps or minimum or pinned):
        raise InvalidRequest(
            "a shared pool holds no workers of its own: gpu_caps, minimum_worker_count and "
            "pinned_models do not apply (its gpus are its share)",
            param="shared",
        )
    return PoolSpec(
        name=name,
        queue_pool=queue_pool,
        gpus=gpus,
        gpu_caps=caps,
        bundle=request.bundle or None,
        minimum_worker_count=minimum,
        pinned_models=pinned,
        limits=Limits(
            requests_per_minute=request.requests_per_minute,
            tokens_per_minute=request.tokens_per_minute,
            concurrent_streams=request.concurrent_streams,
        ),
        priority=request.priority or 0,
        shared=bool(request.shared),
        share_by_key=bool(request.share_by_key),
    )


def _profile_counts(counts: dict[str, int] | None, config: AppConfig, field: str) -> dict[str, int]:
    result: dict[str, int] = {}
    for raw, count in (counts or {}).items():
        profile = raw.strip().lower()
        if config.profile(profile) is None:
            known = ", ".join(p.name for p in config.profiles)
            raise InvalidRequest(
                f"{field}: unknown machine profile '{raw}' (configured: {known})", param=field
            )
        if count < 0:
            raise InvalidRequest(f"{field}[{raw}] must be >= 0", param=field)
        result[profile] = count
    return result


def _pinned(pinned: str, config: AppConfig) -> str:
    model_id, _, profile = pinned.partition(":")
    model = config.model(model_id)
    if model is None:
        raise InvalidRequest(f"pinned_models: unknown model '{model_id}'", param="pinned_models")
    if profile and profile.lower() not in model.profiles:
        raise InvalidRequest(
            f"pinned_models: model '{model_id}' is not served on profile '{profile}'",
            param="pinned_models",
        )
    return f"{model.id}:{profile.lower()}" if profile else model.id


def pool_body(record: PoolRecord, worker_urls: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The SIE `PoolResponse`: {name, spec, status}. `worker_urls` maps worker id ->
    (url, profile) for `assigned_workers`."""
    spec = record.spec
    assigned = []
    for worker_id in record.assigned_workers:
        url, profile = worker_urls.get(worker_id, ("", ""))
        assigned.append(
            {"name": worker_id, "url": url, "gpu": profile, "bundle": spec.bundle or ""}
        )
    return {
        "name": spec.name,
        "spec": {
            "name": spec.name,
            "queue_pool": spec.queue_pool,
            "gpus": dict(spec.gpus),
            "gpu_caps": dict(spec.gpu_caps),
            "bundle": spec.bundle,
            "minimum_worker_count": spec.minimum_worker_count,
            "pinned_models": list(spec.pinned_models),
            **spec_tenancy(spec),
        },
        "status": {
            "state": record.state,
            "assigned_workers": assigned,
            "created_at": record.created_at,
            "last_renewed": record.last_renewed,
            "expires_at": record.expires_at(),
        },
    }


def spec_tenancy(spec: PoolSpec) -> dict[str, Any]:
    """The spec's tenancy fields as the API shows them."""
    return {
        "requests_per_minute": spec.limits.requests_per_minute,
        "tokens_per_minute": spec.limits.tokens_per_minute,
        "concurrent_streams": spec.limits.concurrent_streams,
        "priority": spec.priority,
        "shared": spec.shared,
        "share_by_key": spec.share_by_key,
    }


def pool_list_item(record: PoolRecord) -> dict[str, Any]:
    """The SIE `PoolListItem`."""
    return {
        "name": record.name,
        "state": record.state,
        "gpus": dict(record.spec.gpus),
        "worker_count": len(record.assigned_workers),
    }
