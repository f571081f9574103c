"""Pools on a real multi-node Ray cluster: the session cluster (or, run alone, one of this
module's own) plus two logical GPU nodes started on this machine (`l4`: 2 GPUs, `a100`: 1
GPU). A Serve app `pools` with the fake engine and `external_scaler_enabled` is driven with
the real sie-sdk client (tests/sie.py) and httpx: pool creation, placement on the right nodes,
routing with gpu="pool/profile", PROVISIONING then success, caps against cluster capacity,
an autoscaler restart, lease expiry, deletion. Timings are printed (run with -s to see them)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import pytest
from ray.exceptions import RayError

from app.serve_env import free_port
from tests.conftest import FAKE_MODEL, ROOT
from tests.sie import SIERunner

pytestmark = pytest.mark.integration

APP = "pools"
LEASE_S = 20.0
COOLDOWN_S = 3.0
NODE_START_ATTEMPTS = 4
T = TypeVar("T")


def pools_app_args() -> dict[str, Any]:
    return {
        "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
        "models": [
            {
                "id": FAKE_MODEL,
                "profiles": ["cpu", "l4", "a100"],
                "engine": {"extra_args": {"token_delay_s": 0.02, "load_delay_s": 0.5}},
            }
        ],
        "profiles": [
            {"name": "cpu", "num_cpus": 0, "num_replicas": 1},
            {
                "name": "l4",
                "num_cpus": 0,
                "num_gpus": 1,
                "accelerator_type": "L4",
                "num_replicas": 0,
            },
            {
                "name": "a100",
                "num_cpus": 0,
                "num_gpus": 1,
                "accelerator_type": "A100",
                "num_replicas": 0,
            },
        ],
        "worker_heartbeat_seconds": 0.5,
        "pools": {
            "lease_seconds": LEASE_S,
            "control_interval_seconds": 0.5,
            "scale_down_cooldown_seconds": COOLDOWN_S,
            "provisioning_retry_after_seconds": 1,
        },
    }


@dataclass
class PoolCluster:
    base_url: str
    nodes: dict[str, str]  # profile -> node id
    sie: SIERunner
    raylets: dict[str, Any] = field(default_factory=dict)
    """profile -> the ray Node object of the added node (to kill it)."""
    kept: set[str] = field(default_factory=set)
    """Pools a background thread renews (the short test lease would expire them otherwise)."""

    def keep(self, name: str) -> None:
        self.kept.add(name)

    def renew_forever(self, stop: threading.Event) -> None:
        while not stop.wait(2.0):
            for name in list(self.kept):
                with contextlib.suppress(httpx.HTTPError):
                    httpx.post(f"{self.base_url}/v1/pools/{name}/renew", timeout=10)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/health", timeout=10).json()  # type: ignore[no-any-return]

    def pool(self, name: str) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/v1/pools/{name}", timeout=10).json()  # type: ignore[no-any-return]

    def autoscaler(self) -> dict[str, Any]:
        from ray import serve

        handle = serve.get_deployment_handle("PoolAutoscaler", app_name=APP)
        return handle.status.remote().result(timeout_s=10)  # type: ignore[no-any-return]

    def workers(self, profile: str, pool: str | None = None) -> list[dict[str, Any]]:
        return [
            w
            for w in self.health()["workers"]
            if w["gpu"] == profile and w["healthy"] and (pool is None or w["pool"] == pool)
        ]


def wait_for(what: str, check: Callable[[], T], timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        # RayError: the replica asked may have died with a killed node and is being replaced
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError, TimeoutError, RayError):
            last = check()
            if last:
                return last  # type: ignore[no-any-return]
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def _add_node(gcs_address: str, num_gpus: int, resources: dict[str, float]) -> Any:
    """A raylet with logical GPUs joining the cluster from this machine. On a loaded machine
    the raylet may die waiting for its dashboard agent (a fixed 15 s in Ray 2.60,
    ray-project/ray#65983), so try a few times."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    for attempt in range(NODE_START_ATTEMPTS):
        params = RayParams(
            gcs_address=gcs_address,
            node_ip_address="127.0.0.1",
            num_cpus=1,
            num_gpus=num_gpus,
            resources=resources,
            object_store_memory=100 * 1024 * 1024,
            min_worker_port=0,
            max_worker_port=0,
            include_log_monitor=False,
            node_manager_port=0,
        )
        params.dashboard_agent_listen_port = None
        try:
            return Node(params, head=False, shutdown_at_exit=True, spawn_reaper=False)
        except Exception:
            if attempt == NODE_START_ATTEMPTS - 1:
                raise
            time.sleep(5)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster() -> Iterator[PoolCluster]:
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    from app.builder import build_app

    owned = not ray.is_initialized()
    if owned:
        for attempt in range(NODE_START_ATTEMPTS):
            try:
                ray.init(
                    address="local",
                    num_cpus=2,
                    include_dashboard=False,
                    runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}},
                )
                break
            except Exception:  # the head's raylet can time out on a loaded machine
                ray.shutdown()
                if attempt == NODE_START_ATTEMPTS - 1:
                    raise
                time.sleep(5)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    client = _get_global_client()
    assert client is not None
    port = client.http_config.port
    gcs = ray.get_runtime_context().gcs_address
    added = {
        "l4": _add_node(gcs, 2, {"accelerator_type:L4": 1.0}),
        "a100": _add_node(gcs, 1, {"accelerator_type:A100": 1.0}),
    }
    nodes = {profile: node.node_id for profile, node in added.items()}
    wait_for(
        "the GPU nodes",
        lambda: {n["NodeID"] for n in ray.nodes() if n["Alive"]} >= set(nodes.values()),
    )
    serve.run(
        build_app(pools_app_args()),
        name=APP,
        route_prefix=f"/{APP}",
        blocking=False,
        external_scaler_enabled=True,
    )
    base_url = f"http://127.0.0.1:{port}/{APP}"
    state = PoolCluster(base_url, nodes, SIERunner(base_url), raylets=added)
    wait_for(
        "the default cpu worker", lambda: state.health()["models"][0]["state"] == "loaded", 180
    )
    stop = threading.Event()
    renewer = threading.Thread(target=state.renew_forever, args=(stop,), daemon=True)
    renewer.start()
    try:
        yield state
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            serve.delete(APP)
        for node in added.values():
            node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        if owned:
            serve.shutdown()
            ray.shutdown()


def test_sdk_pool_from_zero_on_l4_routes_and_places_on_the_l4_node(cluster: PoolCluster) -> None:
    cluster.keep("eval")  # renewals before it exists are harmless 404s
    result = cluster.sie.run(
        """
        import time
        started = time.time()
        client.create_pool("Eval", gpus={"l4": 1}, gpu_caps={"l4": 2})
        created_s = time.time() - started
        first = catch(client.generate, MODEL, "hi", max_new_tokens=2, gpu="eval/l4",
                      wait_for_capacity=False)
        out = client.generate(MODEL, "hello there", max_new_tokens=3, gpu="eval/l4")
        served_s = time.time() - started
        retries = client.last_retry_count
        while client.get_pool("EVAL")["status"]["state"] != "active":
            time.sleep(0.1)
        active_s = time.time() - started
        capacity = client.wait_for_capacity(gpu="l4", timeout_s=30)
        return {"first": first, "out": out, "retries": retries, "info": client.get_pool("eval"),
                "capacity": capacity, "created_s": created_s, "served_s": served_s,
                "active_s": active_s}
        """,
        inject={"MODEL": FAKE_MODEL},
        timeout_s=120,
    )
    first = result["first"]
    assert first["type"] == "ProvisioningError", first
    assert result["out"]["text"] == "alpha beta gamma "
    assert result["retries"] >= 1, "the SDK waited through 503 PROVISIONING"
    info = result["info"]
    assert info["name"] == "eval" and info["status"]["state"] == "active"
    assigned = info["status"]["assigned_workers"]
    assert [w["gpu"] for w in assigned] == ["l4"]
    workers = cluster.workers("l4", pool="eval")
    assert [w["name"] for w in workers] == [assigned[0]["name"]]
    assert workers[0]["node_id"] == cluster.nodes["l4"], "placed on the node with L4 GPUs"
    assert result["capacity"]["worker_count"] >= 1
    events = wait_for(
        "the l4 scale event to complete",
        lambda: [
            e
            for e in cluster.autoscaler()["scale_events"]
            if e["profile"] == "l4" and e["reached_at"] is not None
        ],
    )
    assert events[0]["previous"] == 0 and events[0]["target"] == 1
    event = events[0]
    print(
        f"\n[timing] pool from zero: create {result['created_s']:.2f} s, first token via SDK "
        f"{result['served_s']:.2f} s, active {result['active_s']:.2f} s; decision -> Serve "
        f"accepted {event['applied_at'] - event['decided_at']:.3f} s, -> worker live "
        f"{event['reached_at'] - event['decided_at']:.2f} s"
    )


def test_pool_takes_a_loaded_worker_at_once_and_default_is_refilled(cluster: PoolCluster) -> None:
    started = time.monotonic()
    body = httpx.post(f"{cluster.base_url}/v1/pools", json={"name": "warm", "gpus": {"cpu": 1}})
    elapsed = time.monotonic() - started
    assert body.status_code == 200, body.text
    cluster.keep("warm")
    status = body.json()["status"]
    assert status["state"] == "active", "the loaded default worker was assigned in the create call"
    print(f"\n[timing] pool create -> active with a loaded worker: {elapsed * 1000:.0f} ms")
    warm_worker = status["assigned_workers"][0]["name"]
    wait_for("a new default cpu worker", lambda: len(cluster.workers("cpu", pool="default")) == 1)
    assert cluster.autoscaler()["replicas"]["cpu"] == 2
    headers = {"X-SIE-Pool": "WARM", "X-SIE-MACHINE-PROFILE": "cpu"}
    for _ in range(4):
        served = httpx.post(
            f"{cluster.base_url}/v1/generate/fake__model",
            json={"prompt": "x", "max_new_tokens": 1},
            headers=headers,
            timeout=30,
        )
        assert served.status_code == 200, served.text
    assert [w["name"] for w in cluster.workers("cpu", pool="warm")] == [warm_worker]


def test_caps_and_cluster_capacity(cluster: PoolCluster) -> None:
    capped = httpx.post(
        f"{cluster.base_url}/v1/pools",
        json={"name": "big", "gpus": {"l4": 2}, "gpu_caps": {"l4": 2}},
    )
    assert capped.status_code == 200
    cluster.keep("big")
    # the l4 node has 2 GPUs and 'eval' (older) holds one: 'big' gets 1 of 2 and stays pending
    reason = wait_for(
        "a capacity reason",
        lambda: [
            r["reason"]
            for r in cluster.autoscaler()["reasons"]
            if "capacity exhausted" in r["reason"] and "'big' gets 1 of 2" in r["reason"]
        ],
    )
    assert reason
    time.sleep(2)
    assert cluster.pool("big")["status"]["state"] == "pending"
    assert cluster.autoscaler()["replicas"]["l4"] == 2, "never above the cluster's 2 L4 GPUs"
    over_cap = httpx.post(
        f"{cluster.base_url}/v1/pools",
        json={"name": "big", "gpus": {"l4": 3}, "gpu_caps": {"l4": 2}},
    )
    assert over_cap.status_code == 400
    assert "exceeds gpu_caps" in over_cap.json()["detail"]["message"]
    # deleting 'eval' gives its worker back; 'big' takes it and becomes active
    cluster.kept.discard("eval")
    assert httpx.delete(f"{cluster.base_url}/v1/pools/eval").status_code == 200
    wait_for("'big' active", lambda: cluster.pool("big")["status"]["state"] == "active", 60)
    assert len(cluster.pool("big")["status"]["assigned_workers"]) == 2


def test_autoscaler_restart_keeps_pools_and_in_flight_requests(cluster: PoolCluster) -> None:
    import ray

    before = {name: cluster.pool(name) for name in ("warm", "big")}
    outcome: dict[str, Any] = {}

    def stream() -> None:
        with httpx.stream(
            "POST",
            f"{cluster.base_url}/v1/generate/fake__model",
            json={"prompt": "x", "max_new_tokens": 150, "stream": True},
            headers={"X-SIE-Pool": "warm"},
            timeout=60,
        ) as response:
            outcome["status"] = response.status_code
            outcome["body"] = response.read().decode()

    reader = threading.Thread(target=stream)
    reader.start()
    time.sleep(0.5)
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith(f"SERVE_REPLICA::{APP}#PoolAutoscaler#")
    ]
    assert len(names) == 1
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    killed_at = time.monotonic()
    reader.join(60)
    assert outcome["status"] == 200
    assert '"done":true' in outcome["body"].replace(" ", ""), "the in-flight stream finished"
    restored = wait_for("the restored autoscaler", lambda: cluster.autoscaler()["restored"], 60)
    assert restored
    print(f"\n[timing] autoscaler back after kill: {time.monotonic() - killed_at:.1f} s")
    for name, old in before.items():
        # active again with the very same workers (names, urls, profiles: the urls come back
        # with the workers' first heartbeats to the new replica)
        new = wait_for(
            f"pool {name} back with its workers",
            lambda n=name, o=old: (  # type: ignore[misc]
                (p := cluster.pool(n))["status"]["state"] == "active"
                and p["status"]["assigned_workers"] == o["status"]["assigned_workers"]
                and p
            ),
            30,
        )
        assert new["spec"] == old["spec"]
        assert new["status"]["created_at"] == old["status"]["created_at"]


def test_short_lease_expires_and_releases_workers(cluster: PoolCluster) -> None:
    for name in ("warm", "big"):
        cluster.kept.discard(name)
        assert httpx.delete(f"{cluster.base_url}/v1/pools/{name}").status_code == 200
    created = httpx.post(
        f"{cluster.base_url}/v1/pools", json={"name": "short", "gpus": {"a100": 1}}
    ).json()
    assert created["status"]["state"] == "pending"
    active = wait_for(
        "'short' active", lambda: cluster.pool("short")["status"]["state"] == "active"
    )
    assert active
    a100 = cluster.workers("a100", pool="short")
    assert a100 and a100[0]["node_id"] == cluster.nodes["a100"]
    expired = wait_for(
        "expiry", lambda: cluster.pool("short")["status"]["state"] == "expired", LEASE_S + 10
    )
    assert expired
    assert cluster.pool("short")["status"]["assigned_workers"] == []

    def refused() -> httpx.Response | None:
        response = httpx.post(
            f"{cluster.base_url}/v1/generate/fake__model",
            json={"prompt": "x", "max_new_tokens": 1},
            headers={"X-SIE-Pool": "short"},
        )
        return response if response.status_code == 410 else None

    # the ingress routes on a pool snapshot refreshed every ~0.5 s: expiry reaches it promptly
    gone = wait_for("410 from the expired pool", refused, 10)
    assert gone.json()["detail"]["code"] == "POOL_EXPIRED"
    wait_for("the a100 worker to go", lambda: not cluster.workers("a100"), COOLDOWN_S + 30)
    assert cluster.autoscaler()["replicas"]["a100"] == 0


def test_sdk_get_and_delete(cluster: PoolCluster) -> None:
    result = cluster.sie.run(
        """
        client.create_pool("Gone", gpu_caps={"cpu": 1})
        got = client.get_pool("gone")
        first = client.delete_pool("GONE")
        second = client.delete_pool("gone")
        return {"got": got, "first": first, "second": second, "after": client.get_pool("gone"),
                "error": catch(client.create_pool, "bad", gpus={"h100": 1})}
        """,
        timeout_s=60,
    )
    assert result["got"]["spec"]["gpu_caps"] == {"cpu": 1}
    assert (result["first"], result["second"], result["after"]) == (True, False, None)
    assert result["error"]["type"] == "PoolError"
    assert "unknown machine profile 'h100'" in result["error"]["message"]


def test_node_loss_lowers_capacity_and_the_pool_waits(cluster: PoolCluster) -> None:
    created = httpx.post(f"{cluster.base_url}/v1/pools", json={"name": "lossy", "gpus": {"l4": 1}})
    assert created.status_code == 200
    cluster.keep("lossy")
    wait_for("'lossy' active", lambda: cluster.pool("lossy")["status"]["state"] == "active")
    assert cluster.autoscaler()["capacity"]["l4"] == 2
    node = cluster.raylets["l4"]
    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
    lost_at = time.monotonic()
    wait_for("l4 capacity 0", lambda: cluster.autoscaler()["capacity"]["l4"] == 0, 120)
    wait_for("'lossy' pending", lambda: cluster.pool("lossy")["status"]["state"] == "pending", 60)
    assert cluster.autoscaler()["replicas"]["l4"] == 0, "no target above what the cluster fits"
    reasons = [r["reason"] for r in cluster.autoscaler()["reasons"]]
    assert any("capacity exhausted" in r and "'lossy' gets 0 of 1" in r for r in reasons)
    refused = httpx.post(
        f"{cluster.base_url}/v1/generate/fake__model",
        json={"prompt": "x", "max_new_tokens": 1},
        headers={"X-SIE-Pool": "lossy", "X-SIE-MACHINE-PROFILE": "l4"},
        timeout=30,
    )
    assert refused.status_code == 503
    assert refused.json()["detail"]["code"] == "PROVISIONING"
    assert refused.headers["Retry-After"] == "1"
    print(f"\n[timing] l4 node lost -> pool pending: {time.monotonic() - lost_at:.1f} s")
    # the replica Serve restarted for the lost worker waits for an l4 GPU; stopped, it has
    # nothing to drain and must not wait out the drain timeout (600 s) in STOPPING
    import ray
    from ray.serve.context import _get_global_client

    def l4_replicas() -> list[str]:
        client = _get_global_client()
        assert client is not None
        details = ray.get(client._controller.get_deployment_details.remote(APP, "Generator-l4"))
        return [str(replica.state) for replica in details.replicas]

    wait_for("no l4 replica waiting for a node", lambda: l4_replicas() == [], 20)
