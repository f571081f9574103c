"""Scale-out on a multi-node local cluster: requests/s, first-token latency and CPU per request
with 1, 2 and 4 ingress replicas, null-engine workers (no token delay) on worker nodes.

    python benchmarks/scale_cluster.py [--ingress 1,2,4] [--streams 64] [--tokens 1]
                                       [--seconds 20] [--workers 2] [--markdown FILE]

Starts `cluster/local-cluster.sh` (a head and `--workers` nodes of profile `cpu`, every
listener on 127.0.0.1), deploys poolserve with the fake engine once per ingress replica count,
runs a closed loop of streaming chat clients (a process of its own) against Serve's HTTP entry,
and reads every cluster process's CPU time from /proc over the measured window. CPU per
request is the cluster's CPU (the load generator's excluded) over the requests it answered. On
2 cores, more ingress replicas cannot serve more requests per second; what must hold is that
the CPU a request costs stays flat as replicas are added. Stops the cluster at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.history import percentile  # noqa: E402
from app.serve_env import free_port  # noqa: E402

CLUSTER = ROOT / "cluster" / "local-cluster.sh"
MODEL = "null/model"
ROLES = (
    ("Ingress", re.compile(r"ServeReplica:poolserve:Ingress")),
    ("Generator", re.compile(r"ServeReplica:poolserve:Generator")),
    ("TenantLedger", re.compile(r"ServeReplica:poolserve:TenantLedger")),
    ("PoolAutoscaler", re.compile(r"ServeReplica:poolserve:PoolAutoscaler")),
    ("MetricsSink", re.compile(r"ServeReplica:poolserve:Metrics")),
    ("HAProxy", re.compile(r"haproxy")),
    ("Serve controller", re.compile(r"ServeController")),
)


def app_args(ingress_replicas: int, workers: int) -> dict[str, Any]:
    return {
        "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
        "models": [
            {
                "id": MODEL,
                "engine": {
                    "extra_args": {
                        "token_delay_s": 0.0,
                        "kv_blocks": 1_000_000,
                        "max_model_len": 1_000_000,
                    }
                },
            }
        ],
        "profiles": [
            {
                "name": "cpu",
                "num_cpus": 0,
                "resources": {"profile:cpu": 1},
                "num_replicas": workers,
                "max_replicas": workers,
                "max_ongoing_requests": 512,
            }
        ],
        "ingress": {"num_replicas": ingress_replicas, "max_ongoing_requests": 1024},
        "kv": {"max_waiting_requests": 1000},
    }


def cluster(*args: str) -> str:
    done = subprocess.run(
        [str(CLUSTER), *args], capture_output=True, text=True, cwd=ROOT, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"local-cluster.sh {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def cluster_processes(temp_dir: str, port: int) -> dict[int, str]:
    """pid -> command line of every process of the local cluster (Ray names its temp dir or
    GCS address in them; Serve's replicas and HAProxy descend from its raylets)."""
    children: dict[int, list[int]] = defaultdict(list)
    cmdlines: dict[int, str] = {}
    roots = []
    address = f"127.0.0.1:{port}"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        pid = int(entry.name)
        cmdlines[pid] = cmd
        children[parent].append(pid)
        if (temp_dir in cmd or address in cmd) and "scale_cluster" not in cmd:
            roots.append(pid)
    found: dict[int, str] = {}
    todo = roots
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = cmdlines.get(pid, "")
            todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: dict[int, str]) -> dict[int, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, ValueError, IndexError):
            pass
    return out


def role_of(cmd: str) -> str:
    for role, pattern in ROLES:
        if pattern.search(cmd):
            return role
    return "rest of Ray"


async def _clients(base: str, streams: int, seconds: float, tokens: int) -> dict[str, Any]:
    import aiohttp

    body = {
        "model": MODEL,
        "stream": True,
        "max_tokens": tokens,
        "messages": [{"role": "user", "content": "tell me a story " * 8}],
    }
    first_token: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.perf_counter()
                first = None
                try:
                    async with session.post(f"{base}/v1/chat/completions", json=body) as reply:
                        async for line in reply.content:
                            if first is None and line.startswith(b"data: {"):
                                first = time.perf_counter() - started
                        if reply.status != 200:
                            errors += 1
                            continue
                except aiohttp.ClientError:
                    errors += 1
                    continue
                first_token.append(first or 0.0)

        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(streams)))
        elapsed = time.monotonic() - started
    return {
        "requests": len(first_token),
        "errors": errors,
        "seconds": elapsed,
        "ttft_p50_ms": 1000 * (percentile(first_token, 50) or 0.0),
        "ttft_p99_ms": 1000 * (percentile(first_token, 99) or 0.0),
    }


def run_load(base: str, streams: int, seconds: float, tokens: int) -> subprocess.Popen[str]:
    """The load generator in a process of its own (its CPU is not the cluster's)."""
    return subprocess.Popen(
        [sys.executable, __file__, "--client", base, str(streams), str(seconds), str(tokens)],
        stdout=subprocess.PIPE,
        text=True,
    )


def measure(
    base: str, args: argparse.Namespace, temp_dir: str, port: int
) -> tuple[dict[str, Any], dict[str, float]]:
    warm = run_load(base, args.streams, 5, args.tokens)
    warm.communicate()
    load = run_load(base, args.streams, args.seconds + 4, args.tokens)
    time.sleep(2)  # the clients connect
    pids = cluster_processes(temp_dir, port)
    before = cpu_seconds(pids)
    time.sleep(args.seconds)
    after = cpu_seconds(pids)
    output, _ = load.communicate()
    result: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    by_role: dict[str, float] = defaultdict(float)
    for pid, cpu in after.items():
        if pid in before:
            by_role[role_of(pids[pid])] += cpu - before[pid]
    result["load_avg"] = os.getloadavg()[0]
    return result, dict(by_role)


def deploy(ingress_replicas: int, workers: int, http_port: int) -> str:
    from ray import serve

    from app.builder import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(
        build_app(app_args(ingress_replicas, workers)),
        name="poolserve",
        route_prefix="/",
        blocking=False,
    )
    base = f"http://127.0.0.1:{http_port}"
    deadline = time.monotonic() + 300
    import httpx

    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{base}/health", timeout=5).json()
            loaded = [w for w in health.get("workers", []) if w.get("state") == "ready"]
            reply = httpx.post(
                f"{base}/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 2,
                },
                timeout=10,
            )
            if reply.status_code == 200 and len(loaded) >= workers:
                return base
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise RuntimeError("poolserve did not become ready")


def table(rows: list[dict[str, Any]]) -> str:
    roles = [role for role, _ in ROLES] + ["rest of Ray"]
    lines = [
        "| ingress replicas | requests/s | first token p50 ms | p99 ms | errors | CPU ms per "
        "request (cluster) | " + " | ".join(f"{role} ms/req" for role in roles) + " | load avg |",
        "|---" * (7 + len(roles)) + "|",
    ]
    for row in rows:
        served = max(row["requests"] * row["window"] / row["seconds"], 1)
        per = {role: 1000 * row["cpu"].get(role, 0.0) / served for role in roles}
        lines.append(
            f"| {row['ingress']} | {row['requests'] / row['seconds']:.0f} | "
            f"{row['ttft_p50_ms']:.1f} | {row['ttft_p99_ms']:.1f} | {row['errors']} | "
            f"{sum(per.values()):.2f} | "
            + " | ".join(f"{per[role]:.2f}" for role in roles)
            + f" | {row['load_avg']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ingress", default="1,2,4", help="ingress replica counts")
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--workers", type=int, default=2, help="worker nodes (one Generator each)")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    import yaml

    state = ROOT / ".cache" / "local-cluster" / "state"
    config_file = ROOT / ".cache" / "bench" / "scale-config.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(
        yaml.safe_dump(
            {
                "applications": [
                    {
                        "name": "poolserve",
                        "import_path": "app.builder:build_app",
                        "args": app_args(1, args.workers),
                    }
                ]
            }
        )
    )
    port = int(os.environ.get("POOLSERVE_LOCAL_RAY_PORT", "6390"))
    cluster("start", "--config", str(config_file), "--nodes-per-profile", str(args.workers))
    rows = []
    try:
        temp_dir = dict(
            line.split("=", 1) for line in state.read_text().splitlines() if "=" in line
        )["TEMP_DIR"]
        os.environ.update(RAY_AUTH_MODE="token", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        import ray
        from ray import serve

        ray.init(
            address=f"127.0.0.1:{port}",
            _node_ip_address="127.0.0.1",
            logging_level="ERROR",
            log_to_driver=False,
        )
        http_port = free_port()
        for replicas in [int(n) for n in args.ingress.split(",")]:
            base = deploy(replicas, args.workers, http_port)
            result, cpu = measure(base, args, temp_dir, port)
            row = {"ingress": replicas, "cpu": cpu, "window": args.seconds, **result}
            rows.append(row)
            print(
                f"{replicas} ingress: {result['requests'] / result['seconds']:.0f} req/s, "
                f"first token p50 {result['ttft_p50_ms']:.1f} ms",
                file=sys.stderr,
            )
        serve.shutdown()
    finally:
        cluster("stop")
    report = (
        f"{args.workers} worker nodes (null engine), {args.streams} streams x {args.tokens} "
        f"token(s), {args.seconds:.0f} s per replica count; {os.cpu_count()} cores\n\n"
        + table(rows)
    )
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        base, streams, seconds, tokens = sys.argv[2:6]
        result = asyncio.run(_clients(base, int(streams), float(seconds), int(tokens)))
        print(json.dumps(result))
        sys.exit(0)
    sys.exit(main())
