"""Head-node failure with GCS fault tolerance: `scripts/stack.py serve` (what `make serve` runs)
with POOLSERVE_GCS_REDIS=1 starts a Redis of its own and a Ray head whose GCS keeps its state
there (free ports, a temp dir and a Redis directory of this test; the fake engine). Under a
streaming load the head's GCS server is SIGKILLed and, after GCS_DOWN_S, started again with the
same command line, as a restarted head pod would (Ray does not restart it: its raylets and
workers wait up to `gcs_rpc_server_reconnect_timeout_s`, 60 s, for it to come back). Then:

- every request of the load finished, or failed with a retryable error (503 before the first
  byte, an in-band error after it);
- the TenantLedger and the PoolAutoscaler replicas are SIGKILLed, so what they show afterwards
  comes from the restarted GCS's key-value store (Redis): the pool with its spec and lease, and
  the usage, equal to what the clients were sent, every request once;
- `stack.py stop` stops the head and the Redis.

Timings are printed (run with -s to see them)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from app.serve_env import free_port
from scripts.stack import process_tree, stop_processes
from tests.conftest import FAKE_MODEL, ROOT, fake_app_args
from tests.support.sse import data
from tests.support.teardowns import Teardowns

pytestmark = pytest.mark.e2e

VENV_PYTHON = Path(sys.executable)
READY_TIMEOUT_S = 600.0
POOL = "ft-team"
TOKEN_DELAY_S = 0.05
MAX_TOKENS = 16  # ~0.8 s a stream: many are in flight when the GCS dies
CLIENTS = 4
LOAD_BEFORE_S = 3.0
GCS_DOWN_S = 5.0
LOAD_AFTER_S = 5.0
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T], timeout_s: float = 120.0) -> T:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as error:  # a replica being replaced, the GCS coming back
            last = error
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@dataclass
class Head:
    api_url: str
    gcs_port: int
    redis_port: int
    temp_dir: Path

    def pids(self) -> list[int]:
        """This head's processes (its GCS, raylet, agents, workers and their descendants)."""
        address = re.compile(rf"(127\.0\.0\.1:|--gcs_server_port=){self.gcs_port}(?!\d)")
        return process_tree(
            lambda cmdline: (
                (address.search(cmdline) is not None or str(self.temp_dir) in cmdline)
                and "pytest" not in cmdline
                and "stack.py" not in cmdline
            )
        )

    def processes(self, needle: str) -> list[int]:
        """The head's processes whose command line (a Ray worker's: its title) has `needle`."""
        found = []
        for pid in self.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if needle.encode() in cmdline:
                found.append(pid)
        return found


def stack_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "POOLSERVE_"))}
    return {
        **env,
        # what the Makefile exports to `scripts/stack.py`
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_agent_register_timeout_ms": "120000",
        "RAY_raylet_start_wait_time_s": "120",
        "HF_HUB_OFFLINE": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory, teardowns: Teardowns) -> Iterator[Head]:
    work = tmp_path_factory.mktemp("gcs-ft")
    temp_dir = Path(tempfile.mkdtemp(prefix="psg-", dir="/tmp"))  # short: Ray's socket paths
    gcs_port, dashboard_port, http_port, redis_port = (free_port() for _ in range(4))
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {**config.get("http_options", {}), "port": http_port}
    args = fake_app_args(token_delay_s=TOKEN_DELAY_S)
    args["profiles"] = [{**args["profiles"][0], "max_replicas": 1}]
    config["applications"][0]["args"] = args
    (work / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    start_args = [
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--num-cpus=4",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
    ]
    env = stack_env(
        POOLSERVE_GCS_REDIS="1",
        POOLSERVE_GCS_REDIS_PORT=str(redis_port),
        POOLSERVE_GCS_REDIS_DIR=str(work / "redis"),
        POOLSERVE_RAY_PORT=str(gcs_port),
        POOLSERVE_RAY_DASHBOARD_PORT=str(dashboard_port),
        POOLSERVE_API_URL=f"http://127.0.0.1:{http_port}",
        POOLSERVE_STACK_STATE=str(work / "stack.json"),
        POOLSERVE_RAY_START_ARGS=shlex.join(start_args),
        POOLSERVE_READY_TIMEOUT_S=str(READY_TIMEOUT_S),
    )

    def stack_py(command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_PYTHON), "scripts/stack.py", command, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S + 120,
            check=False,
        )

    started = Head(env["POOLSERVE_API_URL"], gcs_port, redis_port, temp_dir)
    try:
        began = time.monotonic()
        served = stack_py("serve", "--config", str(work / "serve_config.yaml"))
        assert served.returncode == 0, f"stack.py serve:\n{served.stdout}\n{served.stderr}"
        assert f"Redis for the GCS on 127.0.0.1:{redis_port}" in served.stdout, served.stdout
        print(
            f"\n[gcs-ft] stack.py serve with Redis -> healthy in {time.monotonic() - began:.1f} s"
        )
        yield started
    finally:

        def stop() -> None:
            stopped = stack_py("stop")
            left = stop_processes(started.pids())
            redis_left = stop_processes(
                process_tree(
                    lambda cmdline: f"127.0.0.1:{redis_port}" in cmdline and "redis" in cmdline
                )
            )
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert stopped.returncode == 0, f"stack.py stop:\n{stopped.stdout}\n{stopped.stderr}"
            assert f"stopped Redis on port {redis_port}" in stopped.stdout, stopped.stdout
            assert not left, f"processes of the test's head survived: {left}"
            assert not redis_left, f"the test's Redis survived: {redis_left}"

        # ~30 s of waiting for processes to exit: beside the next tests (tests/support/teardowns)
        teardowns.start("test_gcs_fault_tolerance's head (stack.py stop)", stop)


# --- the load -----------------------------------------------------------------------------------


@dataclass
class Load:
    base_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: Counter[str] = field(default_factory=Counter)
    usage: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def one(self, client: httpx.Client, n: int) -> None:
        body = {
            "model": FAKE_MODEL,
            "messages": [{"role": "user", "content": f"count to {n}"}],
            "max_tokens": MAX_TOKENS,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"X-SIE-Pool": POOL}
        outcome, usage, detail = "ok", None, ""
        began = time.monotonic()
        try:
            with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                if r.status_code != 200:
                    r.read()
                    outcome, detail = f"status_{r.status_code}", r.text[:300]
                else:
                    events = list(data(r))
                    parsed = [json.loads(e) for e in events if e != "[DONE]"]
                    errors = [p["error"] for p in parsed if "error" in p]
                    usage = next((p["usage"] for p in parsed if p.get("usage")), None)
                    if errors:
                        outcome, detail = f"inband_{errors[0].get('code')}", json.dumps(errors[0])
                    elif events[-1:] != ["[DONE]"] or usage is None:
                        outcome, detail = "incomplete", json.dumps(events[-3:])
        except httpx.HTTPError as error:
            outcome, detail = f"client_{type(error).__name__}", str(error)[:300]
        with self.lock:
            self.slowest_s = max(self.slowest_s, time.monotonic() - began)
            self.outcomes[outcome] += 1
            if outcome == "ok" and usage is not None:
                self.usage["requests"] += 1
                self.usage["prompt_tokens"] += usage["prompt_tokens"]
                self.usage["completion_tokens"] += usage["completion_tokens"]
            elif outcome != "ok":
                self.failures.append(f"{outcome}: {detail}")

    def client_loop(self, index: int) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as client:
            n = 0
            while not self.stop.is_set():
                self.one(client, index * 100_000 + n)
                n += 1


RETRYABLE = ("status_503", "inband_transport_failure", "inband_provisioning")


def gcs_server(head: Head) -> tuple[int, list[str], dict[str, str]]:
    """The head's GCS server: pid, argv and environment (to start it again as it was)."""
    (pid,) = head.processes("gcs_server --")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    environ = Path(f"/proc/{pid}/environ").read_bytes().rstrip(b"\0").split(b"\0")
    env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    return pid, [a.decode() for a in argv], env


def listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_gcs_killed_and_restarted_under_load_keeps_pools_leases_and_usage(head: Head) -> None:
    api = httpx.Client(base_url=head.api_url, timeout=30)
    created = api.post("/v1/pools", json={"name": POOL, "shared": True, "priority": 0})
    assert created.status_code == 200, created.text
    before = api.get(f"/v1/pools/{POOL}").json()

    load = Load(head.api_url)
    clients = [threading.Thread(target=load.client_loop, args=(i,)) for i in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        time.sleep(LOAD_BEFORE_S)
        pid, argv, env = gcs_server(head)
        assert any(a.startswith("--redis_address=") for a in argv), argv
        ok_before = load.outcomes["ok"]
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for("the GCS to die", lambda: not Path(f"/proc/{pid}").exists(), 10)
        time.sleep(GCS_DOWN_S)
        ok_while_down = load.outcomes["ok"] - ok_before
        gcs_process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        # reaped as soon as it ends (`stack.py stop` waits for our head's processes to go)
        threading.Thread(target=gcs_process.wait, daemon=True).start()
        wait_for("the GCS port", lambda: listening(head.gcs_port), 60)
        restarted_at = time.monotonic()
        time.sleep(LOAD_AFTER_S)
    finally:
        load.stop.set()
        for client in clients:
            client.join(timeout=120)
    assert not any(c.is_alive() for c in clients), "a load client hung"
    print(
        f"[gcs-ft] GCS down {restarted_at - killed_at:.1f} s; streams finished while it was "
        f"down: {ok_while_down}; load: {dict(load.outcomes)}, slowest {load.slowest_s:.1f} s"
    )
    assert ok_while_down > 0, "no stream finished while the GCS was down"
    unexpected = [f for f in load.failures if not f.startswith(RETRYABLE)]
    assert not unexpected, f"failures that are not retryable: {unexpected[:5]}"

    # The service answers again (a new stream through the restarted GCS's cluster).
    def served() -> bool:
        reply = api.post(
            "/v1/chat/completions",
            json={"model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}],
                  "max_tokens": 2},
            headers={"X-SIE-Pool": POOL},
        )  # fmt: skip
        if reply.status_code == 200:
            load.usage["requests"] += 1
            load.usage["prompt_tokens"] += reply.json()["usage"]["prompt_tokens"]
            load.usage["completion_tokens"] += reply.json()["usage"]["completion_tokens"]
        return reply.status_code == 200

    wait_for("a request served after the restart", served, 120)
    served_at = time.monotonic()

    # What the ledger and the autoscaler show from now on comes from the GCS key-value store
    # (Redis, through the restarted GCS): their replicas die and Serve starts new ones.
    victims = {
        name: head.processes(f"ServeReplica:poolserve:{name}")
        for name in ("TenantLedger", "PoolAutoscaler")
    }
    assert all(len(pids) == 1 for pids in victims.values()), victims
    for (pid,) in victims.values():
        os.kill(pid, signal.SIGKILL)
    for name, (old,) in victims.items():

        def replaced(name: str = name, old: int = old) -> list[int]:
            return [p for p in head.processes(f"ServeReplica:poolserve:{name}") if p != old]

        wait_for(f"a new {name} replica", replaced, 180)

    def pool_back() -> dict[str, Any]:
        reply = api.get(f"/v1/pools/{POOL}")
        return dict(reply.json()) if reply.status_code == 200 else {}

    after = wait_for("the pool from the restarted GCS", pool_back, 180)
    assert after["spec"] == before["spec"]
    assert after["status"]["created_at"] == before["status"]["created_at"]
    assert after["status"]["last_renewed"] >= before["status"]["last_renewed"]
    assert after["status"]["expires_at"] >= before["status"]["expires_at"]

    expected = {k: load.usage[k] for k in ("requests", "prompt_tokens", "completion_tokens")}
    failed = sum(n for outcome, n in load.outcomes.items() if outcome != "ok")

    def billed() -> dict[str, int] | None:
        reply = api.get("/v1/usage", params={"pool": POOL})
        if reply.status_code != 200:
            return None
        sums = reply.json()["pools"][POOL]
        got = {k: int(sums[k]) for k in expected}
        # requests that failed may have reached the engine: billed for what it did, once
        settled = got == expected or (
            failed and expected["requests"] <= got["requests"] <= expected["requests"] + failed
        )
        return got if settled else None

    try:
        got = wait_for("the usage from the restarted GCS", billed, 120)
    except AssertionError:
        reply = api.get("/v1/usage", params={"pool": POOL}).json()
        raise AssertionError(f"billed {reply['pools'].get(POOL)}, clients got {expected}") from None
    print(
        f"[gcs-ft] a new request served {served_at - restarted_at:.1f} s after the restart; billed "
        f"{got}, clients got {expected}; pool and usage back "
        f"{time.monotonic() - served_at:.1f} s after the ledger and autoscaler were killed"
    )
    if not failed:
        assert got == expected, "billed twice or not at all"
