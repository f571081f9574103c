"""The production path end to end: `ray start --head` (free ports, 127.0.0.1 only), `serve
deploy` a copy of serve_config.yaml, `serve status` healthy, a chat request over HTTP, the same
config deployed again (no replica restarts), the example Ray job submitted with `ray job submit`
writing its JSONL through the handles, `serve shutdown`; then only this head's processes are
stopped, even when a step fails."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from app.serve_env import free_port, serve_env
from scripts.stack import process_tree, stop_processes
from tests.conftest import REAL_MODEL, ROOT
from tests.support.teardowns import Teardowns

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 900.0  # engine load on 2 busy cores: 1.5 to 10 min
JOB_TIMEOUT_S = 600.0
NUM_PROMPTS = 6


@dataclass
class Head:
    gcs_port: int
    dashboard_url: str
    temp_dir: Path
    env: dict[str, str]
    serve_stopped: bool = False  # the test ran `serve shutdown` and saw no app left

    def run(
        self, *command: str, timeout_s: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            command,
            env=self.env,
            cwd=ROOT,
            text=True,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
            )
        return result

    def serve(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run(str(BIN / "serve"), *args, "-a", self.dashboard_url, timeout_s=timeout_s)


def head_pids(gcs_port: int, temp_dir: Path) -> list[int]:
    """Processes that name this head's GCS address or temp dir, and all their descendants."""
    address = re.compile(rf"127\.0\.0\.1:{gcs_port}(?!\d)")
    return process_tree(
        lambda cmdline: (
            (address.search(cmdline) is not None or str(temp_dir) in cmdline)
            and "pytest" not in cmdline
        )
    )


@pytest.fixture
def head(teardowns: Teardowns) -> Iterator[Head]:
    gcs_port, dashboard_port = free_port(), free_port()
    temp_dir = Path(tempfile.mkdtemp(prefix="psd-", dir="/tmp"))  # short: Ray's socket paths
    env = {
        **os.environ,
        **serve_env(),  # the README's `eval "$(python -m app.serve_env)"`
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("RAY_ADDRESS", None)
    started = Head(gcs_port, f"http://127.0.0.1:{dashboard_port}", temp_dir, env)
    try:
        started.run(str(BIN / "ray"), "get-auth-token", "--generate")
        started.run(
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--num-cpus=4",
            "--object-store-memory=300000000",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            timeout_s=180,
        )
        started.env["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
        yield started
    finally:

        def stop() -> None:
            if not started.serve_stopped and head_pids(gcs_port, temp_dir):
                started.run(
                    str(BIN / "serve"), "shutdown", "-y", "-a", started.dashboard_url, check=False
                )
            left = stop_processes(head_pids(gcs_port, temp_dir))
            subprocess.run(["rm", "-rf", str(temp_dir)], check=False)
            assert not left, f"processes of the test's Ray head survived: {left}"

        # waiting for the head's processes to exit: beside the next tests (tests/support/teardowns)
        teardowns.start("test_serve_deploy's Ray head", stop)


def deployable_config(directory: Path, http_port: int) -> Path:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {**config.get("http_options", {}), "port": http_port}
    path = directory / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_healthy(head: Head, base_url: str) -> dict[str, object]:
    """Poll /health (cheap) until the model is loaded, then `serve status` until RUNNING."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    status: dict[str, object] = {}
    loaded = False
    for attempt in itertools.count():
        if time.monotonic() > deadline:
            break
        if not loaded:
            try:
                models = httpx.get(f"{base_url}/health", timeout=5).json().get("models") or []
            except (httpx.HTTPError, ValueError):
                models = []
            loaded = bool(models) and all(model["state"] == "loaded" for model in models)
        if loaded or attempt % 10 == 0:  # also look for DEPLOY_FAILED now and then
            status = yaml.safe_load(head.serve("status").stdout) or {}
            app = (status.get("applications") or {}).get("poolserve", {})  # type: ignore[union-attr]
            if app.get("status") == "DEPLOY_FAILED":
                raise AssertionError(f"deploy failed: {app.get('message')}")
            if loaded and app.get("status") == "RUNNING":
                return app  # type: ignore[no-any-return]
        time.sleep(2)
    raise AssertionError(f"not healthy after {READY_TIMEOUT_S:.0f} s: {status}")


def test_serve_deploy_chat_job_and_shutdown(head: Head, tmp_path: Path) -> None:
    http_port = free_port()
    base_url = f"http://127.0.0.1:{http_port}"
    started = time.monotonic()
    head.serve("deploy", str(deployable_config(tmp_path, http_port)))
    app = wait_healthy(head, base_url)
    print(f"serve deploy -> healthy in {time.monotonic() - started:.1f} s")
    deployments = app["deployments"]
    assert isinstance(deployments, dict)
    assert set(deployments) == {"Ingress", "PoolAutoscaler", "TenantLedger", "Generator-cpu"}
    assert all(d["status"] == "HEALTHY" for d in deployments.values())

    reply = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={
            "model": REAL_MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 24,
        },
        timeout=120,
    )
    assert reply.status_code == 200, reply.text
    assert "Paris" in reply.json()["choices"][0]["message"]["content"]

    # the same config again (`make serve` run twice): Serve's code version hashes the YAML's
    # args, not the AppConfig bound to each deployment, so no replica restarts
    replicas = replica_actors(head)
    assert len(replicas) == len(deployments), replicas
    head.serve("deploy", str(deployable_config(tmp_path, http_port)))
    # `serve deploy` returns once the controller holds the new config (the app DEPLOYING), and
    # Serve reports RUNNING again only after its control loop reconciled every deployment with
    # it: a changed deployment would be UPDATING, its app DEPLOYING until its new replicas run
    # (and a changed code version rebuilds the app first, DEPLOYING throughout)
    redeployed = wait_healthy(head, base_url)
    assert redeployed["status"] == "RUNNING"
    assert deployed_at(redeployed) > deployed_at(app), redeployed  # the second deploy applied
    assert replica_actors(head) == replicas

    output = tmp_path / "batch.jsonl"
    job_started = time.monotonic()
    job = head.run(
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={head.dashboard_url}",
        f"--working-dir={ROOT / 'examples'}",
        "--",
        sys.executable,
        "ray_job_batch.py",
        f"--output={output}",
        f"--num-prompts={NUM_PROMPTS}",
        "--max-tokens=16",
        "--tasks=3",
        timeout_s=JOB_TIMEOUT_S,
    )
    print(f"ray job submit -> done in {time.monotonic() - job_started:.1f} s")
    assert "succeeded" in job.stdout.lower(), job.stdout + job.stderr
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [record["index"] for record in records] == list(range(NUM_PROMPTS))
    assert all("error" not in record for record in records), records
    assert all(record["text"].strip() and record["completion_tokens"] > 0 for record in records)
    assert len({record["request_id"] for record in records}) == NUM_PROMPTS
    assert "Paris" in records[0]["text"]  # the first generated prompt asks about France

    head.serve("shutdown", "-y")
    after = yaml.safe_load(head.serve("status").stdout) or {}
    assert not after.get("applications"), after
    assert proxy_gone(base_url), "the HTTP proxy still answers after serve shutdown"
    head.serve_stopped = True  # the teardown need not run `serve shutdown` again


def deployed_at(app: dict[str, object]) -> float:
    """When the controller applied the app's current config (`serve status`)."""
    value = app["last_deployed_time_s"]
    assert isinstance(value, (int, float)), app
    return float(value)


def replica_actors(head: Head) -> set[str]:
    """The live Serve replica actors of the app (named `SERVE_REPLICA::poolserve#<deployment>#<id>`;
    a restarted replica is a new actor)."""
    listed = head.run(
        str(BIN / "ray"),
        "list",
        "actors",
        f"--address={head.dashboard_url}",
        "--filter=state=ALIVE",
        "--format=json",
        "--limit=1000",
    )
    names = (actor.get("name") or "" for actor in json.loads(listed.stdout))
    return {name for name in names if name.startswith("SERVE_REPLICA::poolserve#")}


def proxy_gone(base_url: str, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base_url}/health", timeout=5)
        except httpx.HTTPError:
            return True
        time.sleep(1)
    return False


def test_local_cluster_script_starts_one_node_per_profile_and_stops(tmp_path: Path) -> None:
    """cluster/local-cluster.sh: a head plus a worker node per profile of serve_config.yaml,
    each advertising `profile:<name>`; `stop` leaves none of the cluster's processes."""
    port = free_port()
    env = {
        **os.environ,
        "POOLSERVE_LOCAL_RAY_PORT": str(port),
        "POOLSERVE_LOCAL_DASHBOARD_PORT": str(free_port()),
        "POOLSERVE_LOCAL_STATE_DIR": str(tmp_path / "state"),
    }
    script = str(ROOT / "cluster" / "local-cluster.sh")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", script, *args], env=env, capture_output=True, text=True, timeout=300
        )

    try:
        started = run("start")
        assert started.returncode == 0, started.stdout + started.stderr
        state = dict(
            line.split("=", 1) for line in (tmp_path / "state" / "state").read_text().split()
        )
        status = run("status")
        assert status.returncode == 0, status.stderr
        profiles = {p["name"] for p in serve_app_profiles()}
        for name in profiles | {"head"}:
            assert f"profile:{name}" in status.stdout, status.stdout
        assert head_pids(port, Path(state["TEMP_DIR"]))
    finally:
        stopped = run("stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not head_pids(port, Path(state["TEMP_DIR"]))
    assert not (tmp_path / "state" / "state").exists()


def serve_app_profiles() -> list[dict[str, object]]:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    profiles: list[dict[str, object]] = config["applications"][0]["args"]["profiles"]
    return profiles
