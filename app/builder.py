"""`build_app(args)`: the `import_path` of serve_config.yaml. Validates the args into an
AppConfig, once, and wires Ingress -> Generator-<profile> deployments -> PoolAutoscaler, and the
Ingress -> TenantLedger (limits and usage, service-wide).

Each deployment is bound to the AppConfig itself: a pydantic model unpickles without being
validated again, so every process validates it at most once (here). Serve's versions do not
depend on the bound arguments: `serve deploy` hashes the YAML's `args` (with the import path
and runtime env) into the code version, so the same config restarts nothing and a changed one
rolls every deployment."""

from __future__ import annotations

from typing import Any, cast

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Deployment

from app.config import AppConfig, MachineProfile
from app.deployments.autoscaler import PoolAutoscaler
from app.deployments.generator import Generator
from app.deployments.ingress import Ingress
from app.deployments.ray_private import start_with_zero_replicas
from app.deployments.router import ROUTER_PATH
from app.deployments.tenant_ledger import TenantLedger

LEDGER_MAX_ONGOING_REQUESTS = 100_000


def _deployment(cls: type) -> Deployment:
    return cast(Deployment, serve.deployment(cls))


def build_app(args: dict[str, Any] | None = None) -> Application:
    config = AppConfig.model_validate(args or {})
    autoscaler = (
        _deployment(PoolAutoscaler)
        .options(
            name="PoolAutoscaler",
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            logging_config={"enable_access_log": False},  # heartbeats and pulls, not requests
        )
        .bind(config)
    )
    shards = [_ledger(config, autoscaler, index) for index in range(1, config.tenancy.usage_shards)]
    ledger = _ledger(config, autoscaler, 0, shards)
    generators = {
        profile.name: _generator(profile, config).bind(
            config, profile.name, autoscaler, [ledger, *shards]
        )
        for profile in config.profiles
    }
    return (
        _deployment(Ingress)
        .options(
            name="Ingress",
            num_replicas=config.ingress.num_replicas,
            max_ongoing_requests=config.ingress.max_ongoing_requests,
            ray_actor_options={"num_cpus": 0},
            graceful_shutdown_timeout_s=config.drain_timeout_seconds,
            # a changed config starts the new ingress replicas before the old ones drain
            max_surge_percent=100,
            logging_config={"enable_access_log": config.ingress.access_log},
        )
        .bind(config, autoscaler, generators, ledger)
    )


def _ledger(
    config: AppConfig, autoscaler: Application, shard: int, others: list[Application] | None = None
) -> Application:
    """TenantLedger shard `shard` (0: `TenantLedger`, which merges the `others`' usage)."""
    return (
        _deployment(TenantLedger)
        .options(
            name="TenantLedger" if shard == 0 else f"TenantLedger-{shard}",
            num_replicas=1,
            # every worker bills to it and every ingress replica syncs with it: no queueing in
            # Serve in front of it, and no access-log line per call
            max_ongoing_requests=LEDGER_MAX_ONGOING_REQUESTS,
            logging_config={"enable_access_log": False},
            ray_actor_options={"num_cpus": 0},
        )
        .bind(config, autoscaler, shard, others or [])
    )


def _generator(profile: MachineProfile, config: AppConfig) -> Deployment:
    deployment = _deployment(Generator).options(
        name=profile.deployment_name,
        num_replicas=max(1, profile.num_replicas),
        max_ongoing_requests=profile.max_ongoing_requests,
        ray_actor_options=profile.ray_actor_options(),
        graceful_shutdown_timeout_s=config.drain_timeout_seconds,
        max_surge_percent=profile.rollout_surge_percent,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_PATH,  # type: ignore[arg-type]
        ),
    )
    if profile.num_replicas == 0:  # scaled from zero by the PoolAutoscaler
        start_with_zero_replicas(deployment)
    return deployment
