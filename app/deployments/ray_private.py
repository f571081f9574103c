"""Every private Ray API poolserve uses, and nothing else: a Ray upgrade that moves one breaks
here and in tests/unit/test_ray_private.py, not somewhere in the deployments. Checked against
ray[serve]==2.60.0 (the pin of pyproject.toml), which has no public API for these jobs:

- Ray's GCS key-value store (`ray.experimental.internal_kv`): the pool book and the tenancy
  ledger's usage outlive their replicas;
- the Serve controller (`ray.serve.context._get_global_client()._controller`): set a
  deployment's replica target (the external scaler of `external_scaler_enabled: true`) and read
  which replicas Serve still runs;
- a deployment that starts with 0 replicas (`Deployment._deployment_config`), which
  `Deployment.options(num_replicas=0)` refuses;
- Serve's actor namespace (`SERVE_NAMESPACE`): stop a replica that never got a node.
"""

from __future__ import annotations

import contextlib
from typing import Any

import ray
from ray.exceptions import RayTaskError
from ray.experimental import internal_kv
from ray.serve._private.common import DeploymentID, ReplicaState
from ray.serve._private.constants import SERVE_NAMESPACE
from ray.serve.context import _get_global_client
from ray.serve.deployment import Deployment
from ray.serve.handle import DeploymentHandle

__all__ = [
    "GONE_STATES",
    "kv_delete",
    "kv_get",
    "kv_keys",
    "kv_put",
    "route_on_this_loop",
    "running_replica_ids",
    "set_replica_target",
    "start_with_zero_replicas",
    "stop_unplaced_replicas",
]

GONE_STATES = frozenset({ReplicaState.STOPPING, ReplicaState.STOPPED})
"""Replica states of a replica Serve no longer runs."""


def kv_get(key: str | bytes, namespace: str) -> bytes | None:
    value: bytes | None = internal_kv._internal_kv_get(key, namespace=namespace)
    return value


def kv_put(key: str, value: str | bytes, namespace: str) -> None:
    internal_kv._internal_kv_put(key, value, overwrite=True, namespace=namespace)


def kv_delete(key: str | bytes, namespace: str) -> None:
    internal_kv._internal_kv_del(key, namespace=namespace)


def kv_keys(prefix: str, namespace: str) -> list[bytes]:
    keys: list[bytes] = internal_kv._internal_kv_list(prefix, namespace=namespace)
    return keys


def route_on_this_loop(handle: DeploymentHandle[Any]) -> DeploymentHandle[Any]:
    """The handle routes on its caller's event loop rather than Serve's separate router loop
    (`RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0` for this handle only: no hand-off between loops
    per call). Only for handles called from a replica's event loop; a handle that was used
    already, or one made outside an event loop, keeps Serve's router loop."""
    if isinstance(handle, DeploymentHandle) and handle._router is None:
        with contextlib.suppress(RuntimeError):  # no running event loop here
            handle._init(_run_router_in_separate_loop=False)  # type: ignore[no-untyped-call]
    return handle


async def running_replica_ids(app_name: str, deployment: str) -> set[str] | None:
    """The ids of the replicas Serve runs (or starts) for a deployment; None when there is no
    Serve controller to ask. A failed controller call raises its RayError."""
    client = _get_global_client()
    if client is None:
        return None
    details = await client._controller.get_deployment_details.remote(app_name, deployment)
    return {r.replica_id for r in details.replicas if r.state not in GONE_STATES}


async def set_replica_target(app_name: str, deployment: str, target: int) -> None:
    """Serve's external scaler: the deployment's replica count becomes `target` (refused with a
    RayError unless the application is deployed with `external_scaler_enabled: true`)."""
    client = _get_global_client()
    assert client is not None
    await client._controller.update_deployment_replicas.remote(
        DeploymentID(name=deployment, app_name=app_name), target
    )


async def stop_unplaced_replicas(app_name: str, deployment: str) -> int:
    """Kill the actors of the deployment's stopping replicas that never got a node (their
    actor still waits for resources, e.g. a lost node's GPUs); returns how many. Serve stops
    such a replica as it stops a running one: it asks it to drain and waits the deployment's
    `graceful_shutdown_timeout_s` (the drain timeout, 600 s by default) for an answer that
    cannot come, and the scale-down, the app's deletion or a redeploy wait with it. It has
    nothing to drain; once its actor is gone Serve counts it stopped."""
    client = _get_global_client()
    if client is None:
        return 0
    try:
        details = await client._controller.get_deployment_details.remote(app_name, deployment)
    except RayTaskError as error:
        if isinstance(error.cause, KeyError):
            return 0  # the deployment is deleted already
        raise
    killed = 0
    for replica in details.replicas:
        if replica.state == ReplicaState.STOPPING and not replica.node_id:
            with contextlib.suppress(ValueError):  # gone already
                actor = ray.get_actor(replica.actor_name, namespace=SERVE_NAMESPACE)
                ray.kill(actor, no_restart=True)
                killed += 1
    return killed


def start_with_zero_replicas(deployment: Deployment) -> None:
    """Serve's API refuses 0 replicas at deploy time (only its external scaler may set 0), but
    the deployment config allows it: the deployment starts empty, scaled from zero later."""
    deployment._deployment_config.num_replicas = 0
