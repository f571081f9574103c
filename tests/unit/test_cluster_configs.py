"""serve_config.yaml and the cluster/ files agree: Ray's own schemas accept them, the KubeRay
RayService embeds the same applications, and the cluster launcher, the RayService and the local
cluster script have one node type / worker group per machine profile whose resources fit that
profile's Generator replica."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config import AppConfig, MachineProfile

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIG = ROOT / "serve_config.yaml"
CLUSTER = ROOT / "cluster"
IMPORT_PATH = "app.builder:build_app"


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def serve_app(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = [a for a in config["applications"] if a["import_path"] == IMPORT_PATH]
    return app


def app_config(config: dict[str, Any]) -> AppConfig:
    return AppConfig.model_validate(serve_app(config).get("args") or {})


def embedded_serve_config() -> dict[str, Any]:
    service = load(CLUSTER / "rayservice.yaml")
    embedded: dict[str, Any] = yaml.safe_load(service["spec"]["serveConfigV2"])
    return embedded


# -- resource fitting (pure) ---------------------------------------------------------------


def shortfalls(profile: MachineProfile, node: dict[str, float]) -> list[str]:
    """What a node with `node` resources lacks to host one replica of `profile`."""
    needs: dict[str, float] = {"CPU": profile.num_cpus, "GPU": profile.num_gpus}
    if profile.accelerator_type:
        needs[f"accelerator_type:{profile.accelerator_type}"] = 0.001
    needs.update(profile.resources)
    return [
        f"{name}: needs {amount}, has {node.get(name, 0)}"
        for name, amount in needs.items()
        if amount > 0 and node.get(name, 0) < amount
    ]


def most_replicas(profile: MachineProfile) -> int:
    """Replicas the pools may run of this profile (the cluster must have room for them)."""
    return max(profile.num_replicas, profile.max_replicas or 0)


def replicas_per_node(profile: MachineProfile, node: dict[str, float]) -> float:
    needs = {"CPU": profile.num_cpus, "GPU": profile.num_gpus, **profile.resources}
    fits = [node.get(name, 0) // amount for name, amount in needs.items() if amount > 0]
    return min(fits) if fits else float("inf")


def kube_quantity(value: str | int | float) -> float:
    """Kubernetes CPU / GPU quantities: '4', '500m', 2."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_group_resources(group: dict[str, Any]) -> dict[str, float]:
    """What a KubeRay worker pod offers Ray: rayStartParams win, else the container's limits."""
    params = group.get("rayStartParams", {})
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    requests = container["resources"]["requests"]
    assert limits == requests, "guaranteed QoS: requests == limits"
    resources: dict[str, float] = {
        "CPU": kube_quantity(params.get("num-cpus", limits["cpu"])),
        "GPU": kube_quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
    }
    assert resources["CPU"] <= kube_quantity(limits["cpu"]), "Ray CPUs beyond the pod's"
    assert resources["GPU"] <= kube_quantity(limits.get("nvidia.com/gpu", 0)), "GPUs beyond"
    resources.update(yaml.safe_load(params.get("resources", "{}")) or {})
    return resources


GPU_PROFILE = MachineProfile(
    name="l4", num_cpus=4, num_gpus=1, accelerator_type="L4", resources={"nvme": 1}
)


@pytest.mark.parametrize(
    ("node", "missing"),
    [
        ({"CPU": 8, "GPU": 1, "accelerator_type:L4": 1, "nvme": 1}, []),
        ({"CPU": 8, "GPU": 1, "nvme": 1}, ["accelerator_type:L4"]),
        ({"CPU": 8, "GPU": 0, "accelerator_type:L4": 1, "nvme": 1}, ["GPU"]),
        ({"CPU": 2, "GPU": 1, "accelerator_type:L4": 1, "nvme": 1}, ["CPU"]),
        ({"CPU": 8, "GPU": 1, "accelerator_type:L4": 1}, ["nvme"]),
    ],
)
def test_shortfalls_checks_every_kind_of_resource(
    node: dict[str, float], missing: list[str]
) -> None:
    assert [line.split(":")[0] for line in shortfalls(GPU_PROFILE, node)] == [
        m.split(":")[0] for m in missing
    ]


def test_replicas_per_node_is_bounded_by_the_scarcest_resource() -> None:
    node = {"CPU": 16, "GPU": 2, "accelerator_type:L4": 1, "nvme": 3}
    assert replicas_per_node(GPU_PROFILE, node) == 2
    assert replicas_per_node(GPU_PROFILE, {**node, "GPU": 8}) == 3
    assert replicas_per_node(GPU_PROFILE, {**node, "CPU": 3}) == 0


def test_kubernetes_quantities() -> None:
    assert kube_quantity("500m") == 0.5
    assert kube_quantity("4") == 4.0
    assert kube_quantity(2) == 2.0


# -- serve_config.yaml ----------------------------------------------------------------------


def test_serve_config_passes_rays_serve_schema_and_app_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    for config in (load(SERVE_CONFIG), embedded_serve_config()):
        schema = ServeDeploySchema.model_validate(config)
        assert [app.import_path for app in schema.applications] == [IMPORT_PATH]
        assert app_config(config).profiles


def test_serve_config_builds_the_expected_deployments() -> None:
    from ray.serve._private.build_app import build_app as build_serve_app

    from app.builder import build_app

    config = app_config(load(SERVE_CONFIG))
    built = build_serve_app(build_app(serve_app(load(SERVE_CONFIG))["args"]), name="poolserve")
    expected = {"Ingress", "PoolAutoscaler", "TenantLedger"} | {
        p.deployment_name for p in config.profiles
    }
    assert {deployment.name for deployment in built.deployments} == expected
    for deployment in built.deployments:
        profile = next((p for p in config.profiles if p.deployment_name == deployment.name), None)
        if profile is not None:
            assert deployment.ray_actor_options == {
                **deployment.ray_actor_options,
                **profile.ray_actor_options(),
            }


# -- KubeRay RayService ----------------------------------------------------------------------


def test_rayservice_embeds_the_serve_config_applications() -> None:
    service = load(CLUSTER / "rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    embedded = embedded_serve_config()
    assert embedded["applications"] == load(SERVE_CONFIG)["applications"]
    assert embedded["http_options"]["host"] == "0.0.0.0"  # reachable from the Kubernetes service


def test_rayservice_ray_version_matches_the_lock() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pinned = re.search(r"^ray(?:\[[^\]]*\])?==([\w.]+)", lock, re.MULTILINE)
    assert pinned is not None
    cluster = load(CLUSTER / "rayservice.yaml")["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == pinned.group(1)


def test_rayservice_has_a_fitting_worker_group_per_profile() -> None:
    config = app_config(load(SERVE_CONFIG))
    cluster = load(CLUSTER / "rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    assert set(groups) == {profile.name for profile in config.profiles}
    for profile in config.profiles:
        group = groups[profile.name]
        assert shortfalls(profile, worker_group_resources(group)) == [], profile.name
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        per_pod = replicas_per_node(profile, worker_group_resources(group))
        assert group["maxReplicas"] * per_pod >= most_replicas(profile), profile.name
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert str(head["num-cpus"]) == "0", "generation must not land on the head"


def test_rayservice_keeps_its_gcs_in_the_redis_of_gcs_redis_yaml() -> None:
    """GCS fault tolerance: the RayService names the Service, port and password Secret that
    cluster/gcs-redis.yaml creates, and that Redis appends every write to a persistent volume."""
    options = load(CLUSTER / "rayservice.yaml")["spec"]["rayClusterConfig"][
        "gcsFaultToleranceOptions"
    ]
    redis = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(
        (CLUSTER / "gcs-redis.yaml").read_text()
    )}  # fmt: skip
    host, port = options["redisAddress"].split(":")
    (service_port,) = redis[("Service", host)]["spec"]["ports"]
    assert service_port["port"] == int(port)
    secret = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert secret["key"] in redis[("Secret", secret["name"])]["stringData"]
    pod = redis[("Deployment", host)]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    (password,) = container["env"]
    assert password["valueFrom"]["secretKeyRef"] == secret
    (volume,) = pod["volumes"]
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in redis
    assert container["volumeMounts"][0]["mountPath"] == args[args.index("--dir") + 1]


# -- cluster launcher ------------------------------------------------------------------------


def test_cluster_launcher_config_passes_rays_schema() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(load(CLUSTER / "ray-cluster.yaml")))


def test_cluster_launcher_has_a_fitting_node_type_per_profile() -> None:
    config = app_config(load(SERVE_CONFIG))
    launcher = load(CLUSTER / "ray-cluster.yaml")
    types = launcher["available_node_types"]
    head = launcher["head_node_type"]
    workers = {name.removeprefix("worker-"): spec for name, spec in types.items() if name != head}
    assert set(types) == {head} | {f"worker-{name}" for name in workers}
    assert set(workers) == {profile.name for profile in config.profiles}
    assert types[head]["resources"].get("CPU") == 0
    for profile in config.profiles:
        spec = workers[profile.name]
        assert shortfalls(profile, spec["resources"]) == [], profile.name
        assert spec["max_workers"] >= max(spec["min_workers"], 1)
        per_node = replicas_per_node(profile, spec["resources"])
        assert spec["max_workers"] * per_node >= most_replicas(profile), profile.name


def test_cluster_launcher_installs_the_project_like_make_install() -> None:
    launcher = load(CLUSTER / "ray-cluster.yaml")
    setup = " && ".join(launcher["setup_commands"])
    assert "pip install -q --no-deps -r requirements.lock" in setup
    assert "--no-deps --no-build-isolation -e ." in setup
    assert "python -m app.engine.default_model" in setup
    assert "/home/ubuntu/poolserve" in launcher["file_mounts"]


# -- local multi-node cluster ----------------------------------------------------------------


def local_profiles(config_path: Path) -> dict[str, tuple[int, int, dict[str, float]]]:
    result = subprocess.run(
        ["bash", str(CLUSTER / "local-cluster.sh"), "profiles", "--config", str(config_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    nodes = {}
    for line in result.stdout.splitlines():
        name, cpus, gpus, resources = line.split(" ", 3)
        nodes[name] = (int(cpus), int(gpus), yaml.safe_load(resources))
    return nodes


def test_local_cluster_nodes_fit_the_serve_config_profiles() -> None:
    config = app_config(load(SERVE_CONFIG))
    nodes = local_profiles(SERVE_CONFIG)
    assert set(nodes) == {profile.name for profile in config.profiles}
    for profile in config.profiles:
        cpus, gpus, resources = nodes[profile.name]
        assert shortfalls(profile, {"CPU": cpus, "GPU": gpus, **resources}) == []
        assert resources[f"profile:{profile.name}"] == max(most_replicas(profile), 1)
        assert replicas_per_node(profile, {"CPU": cpus, "GPU": gpus, **resources}) >= (
            most_replicas(profile)
        )


def test_local_cluster_gives_gpu_profiles_logical_gpus_and_accelerator_types(
    tmp_path: Path,
) -> None:
    config = load(SERVE_CONFIG)
    args = serve_app(config).setdefault("args", {})
    args["profiles"] = [
        *args.get("profiles", []),
        GPU_PROFILE.model_dump(exclude_defaults=True) | {"num_replicas": 2},
    ]
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    cpus, gpus, resources = local_profiles(path)["l4"]
    assert (cpus, gpus) == (8, 2)
    assert resources == {"nvme": 2, "accelerator_type:L4": 1, "profile:l4": 2}


def test_every_cluster_runs_the_serve_settings() -> None:
    """app/serve_env.py's settings reach the replicas through serve_config.yaml and the
    RayService's runtime_env, and every node of the KubeRay and `ray up` clusters."""
    from app.serve_env import SERVE_ENV

    for config in (load(SERVE_CONFIG), embedded_serve_config()):
        for app in config["applications"]:
            assert SERVE_ENV.items() <= app["runtime_env"]["env_vars"].items()
    rayservice = load(ROOT / "cluster" / "rayservice.yaml")["spec"]["rayClusterConfig"]
    groups = [rayservice["headGroupSpec"], *rayservice["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in container.get("env", [])}
            assert SERVE_ENV.items() <= env.items(), container["name"]
    ray_up = load(ROOT / "cluster" / "ray-cluster.yaml")
    for command in (*ray_up["head_start_ray_commands"], *ray_up["worker_start_ray_commands"]):
        if "ray start" in command:
            assert all(f"{k}={v}" in command for k, v in SERVE_ENV.items()), command
