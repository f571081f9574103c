"""The private Ray APIs of app/deployments/ray_private.py are still where and what it expects
(checked against ray[serve]==2.60.0; this fails when an upgrade moves one), and no other module
of app/ reaches for a private Ray API. Imports Ray only: no cluster is started."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve.deployment import Deployment

from app.deployments import ray_private

APP = Path(__file__).resolve().parents[2] / "app"
PRIVATE_MODULE = APP / "deployments" / "ray_private.py"


def parameters(function: Callable[..., Any]) -> list[str]:
    """Its parameters, without the `_ray_trace_ctx` Ray adds to actor methods once a session
    has made an actor class remote."""
    return [p for p in inspect.signature(function).parameters if p != "_ray_trace_ctx"]


def test_internal_kv_functions_take_what_we_pass() -> None:
    from ray.experimental import internal_kv

    assert ray_private.internal_kv is internal_kv
    assert parameters(internal_kv._internal_kv_get)[:2] == ["key", "namespace"]
    assert parameters(internal_kv._internal_kv_put)[:4] == [
        "key",
        "value",
        "overwrite",
        "namespace",
    ]
    assert {"key", "namespace"} <= set(parameters(internal_kv._internal_kv_del))
    assert parameters(internal_kv._internal_kv_list)[:2] == ["prefix", "namespace"]


def test_deployment_id_and_replica_states() -> None:
    from ray.serve._private.common import DeploymentID, ReplicaState

    deployment_id = DeploymentID(name="Generator-cpu", app_name="poolserve")
    assert (deployment_id.name, deployment_id.app_name) == ("Generator-cpu", "poolserve")
    assert ray_private.GONE_STATES == {ReplicaState.STOPPING, ReplicaState.STOPPED}
    assert {"RUNNING", "STARTING"} <= {state.name for state in ReplicaState}


def test_serve_controller_client_and_the_calls_we_make() -> None:
    from ray.serve._private.client import ServeControllerClient
    from ray.serve._private.controller import ServeController
    from ray.serve.context import _get_global_client
    from ray.serve.schema import DeploymentDetails, ReplicaDetails

    assert parameters(_get_global_client) == ["raise_if_no_controller_running"]
    assert "self._controller" in inspect.getsource(ServeControllerClient.__init__)
    assert parameters(ServeController.get_deployment_details) == [
        "self",
        "app_name",
        "deployment_name",
    ]
    assert inspect.signature(ServeController.get_deployment_details).return_annotation in (
        DeploymentDetails,
        "DeploymentDetails",
    )
    assert "replicas" in DeploymentDetails.model_fields
    assert {"replica_id", "state", "node_id", "actor_name"} <= set(ReplicaDetails.model_fields)
    assert parameters(ServeController.update_deployment_replicas) == [
        "self",
        "deployment_id",
        "target_num_replicas",
    ]


def test_serve_names_its_replica_actors_in_its_namespace() -> None:
    """`stop_unplaced_replicas` finds a replica's actor by its `actor_name` in Serve's
    namespace, as Serve's controller does."""
    from ray.serve._private import deployment_state
    from ray.serve._private.constants import SERVE_NAMESPACE

    assert SERVE_NAMESPACE == "serve"
    assert "namespace=SERVE_NAMESPACE" in inspect.getsource(deployment_state.ActorReplicaWrapper)


def test_a_deployment_can_start_with_zero_replicas() -> None:
    class Idle:
        pass

    deployment = cast(Deployment, serve.deployment(Idle)).options(name="Idle", num_replicas=1)
    ray_private.start_with_zero_replicas(deployment)
    assert deployment._deployment_config.num_replicas == 0


def private_ray_uses(path: Path) -> list[str]:
    """Imports of a private Ray module or name in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ray"):
            module = node.module or ""
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            module, names = "", [alias.name for alias in node.names if alias.name.startswith("ray")]
        else:
            continue
        dotted = [f"{module}.{name}" if module else name for name in names]
        found += [
            name
            for name in dotted
            if any(part.startswith("_") for part in name.split("."))
            or name.startswith("ray.experimental")
        ]
    return found


def test_no_other_module_imports_a_private_ray_api() -> None:
    offenders = {
        str(path.relative_to(APP.parent)): uses
        for path in sorted(APP.rglob("*.py"))
        if path != PRIVATE_MODULE and (uses := private_ray_uses(path))
    }
    assert offenders == {}, "import them through app/deployments/ray_private.py"


def test_the_scan_sees_the_private_module() -> None:
    assert set(private_ray_uses(PRIVATE_MODULE)) == {
        "ray.experimental.internal_kv",
        "ray.serve._private.common.DeploymentID",
        "ray.serve._private.common.ReplicaState",
        "ray.serve._private.constants.SERVE_NAMESPACE",
        "ray.serve.context._get_global_client",
    }


def test_a_handle_can_route_on_its_callers_loop() -> None:
    """`route_on_this_loop` relies on DeploymentHandle._init's option and its `_router`."""
    from ray.serve._private.handle_options import InitHandleOptions
    from ray.serve.handle import DeploymentHandle

    assert "_run_router_in_separate_loop" in {f.name for f in dataclasses.fields(InitHandleOptions)}
    assert "_router" in inspect.getsource(DeploymentHandle.__init__)
    assert parameters(DeploymentHandle._init) == ["self", "kwargs"]


def test_stop_unplaced_replicas_kills_only_stopping_replicas_without_a_node(
    monkeypatch: Any,
) -> None:
    """Against a fake controller: a STOPPING replica with no node is killed (without restart);
    a STOPPING one on a node drains as Serve asks it to, a running one is left alone, one whose
    actor is gone already is not counted; a deleted deployment (KeyError in the controller)
    has nothing to stop."""
    import asyncio
    from types import SimpleNamespace

    import ray
    from ray.exceptions import RayTaskError
    from ray.serve._private.common import ReplicaState
    from ray.serve._private.constants import SERVE_NAMESPACE

    replicas = [
        SimpleNamespace(state=ReplicaState.STOPPING, node_id=None, actor_name="lost"),
        SimpleNamespace(state=ReplicaState.STOPPING, node_id="", actor_name="lost-too"),
        SimpleNamespace(state=ReplicaState.STOPPING, node_id="n1", actor_name="draining"),
        SimpleNamespace(state=ReplicaState.RUNNING, node_id=None, actor_name="running"),
        SimpleNamespace(state=ReplicaState.STOPPING, node_id=None, actor_name="gone"),
    ]
    deleted = False

    async def details(app_name: str, deployment: str) -> Any:
        assert (app_name, deployment) == ("poolserve", "Generator-l4")
        if deleted:
            raise RayTaskError(  # type: ignore[no-untyped-call]
                "get_deployment_details", "", KeyError(deployment)
            )
        return SimpleNamespace(replicas=replicas)

    controller = SimpleNamespace(get_deployment_details=SimpleNamespace(remote=details))
    monkeypatch.setattr(
        ray_private, "_get_global_client", lambda: SimpleNamespace(_controller=controller)
    )
    looked_up: list[tuple[str, str]] = []
    killed: list[tuple[str, bool]] = []

    def get_actor(name: str, namespace: str) -> str:
        looked_up.append((name, namespace))
        if name == "gone":
            raise ValueError(name)
        return name

    monkeypatch.setattr(ray, "get_actor", get_actor)
    monkeypatch.setattr(ray, "kill", lambda actor, no_restart: killed.append((actor, no_restart)))
    stopped = asyncio.run(ray_private.stop_unplaced_replicas("poolserve", "Generator-l4"))
    assert stopped == 2
    assert killed == [("lost", True), ("lost-too", True)]
    assert {namespace for _, namespace in looked_up} == {SERVE_NAMESPACE}
    deleted = True
    assert asyncio.run(ray_private.stop_unplaced_replicas("poolserve", "Generator-l4")) == 0
    monkeypatch.setattr(ray_private, "_get_global_client", lambda: None)  # no Serve here
    assert asyncio.run(ray_private.stop_unplaced_replicas("poolserve", "Generator-l4")) == 0
