"""Changes to a running service under load (issue 16): 8 closed-loop streaming clients that honour
Retry-After (as the sie-sdk does) run while the service changes; for each change, the requests,
failures, streams cut and the longest wait before a first token. Results: docs/reliability.md.

Scenarios (default: all, in this order):
- redeploy-ingress: `serve deploy` of serve_config.yaml with an ingress setting changed (the
  Ingress and the PoolAutoscaler restart; the engines keep serving).
- redeploy-engine: `serve deploy` with a worker setting changed (kv.max_wait_seconds): every
  Generator restarts; with surge a new engine loads beside the old one, which then drains.
- pool-delete: a pool gets a worker of its own (a second engine), 4 of the clients stream through
  it, and it is deleted mid-stream; its worker returns to the default pool and, after the
  scale-down cooldown, is stopped while the default pool's clients stream on it.
- drain-node: on a cluster of its own (`cluster/local-cluster.sh`: a head and two cpu nodes),
  `ray drain-node` the node that hosts the Generator, as KubeRay and the cluster autoscaler do.

The first three run against a running `make serve` stack (API on 127.0.0.1:8000, Ray dashboard
on :8265), the last one against its own. Nothing else may run on the machine meanwhile.

    make serve
    .venv/bin/python benchmarks/changes.py [--scenarios redeploy-ingress,pool-delete] [--out F]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import yaml  # noqa: E402

from scripts.stack import ENV  # noqa: E402
from tests.support.closed_loop import ClosedLoop, LoopResult  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BIN = Path(sys.executable).parent
POOL = "drain-test"
SCENARIOS = ("redeploy-ingress", "redeploy-engine", "pool-delete", "drain-node")


class Stack:
    def __init__(self, api: str, dashboard: str, env: dict[str, str]) -> None:
        self.api = api
        self.dashboard = dashboard
        self.env = env

    def deploy(self, config: dict[str, Any]) -> None:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            yaml.safe_dump(config, handle)
        result = subprocess.run(
            [str(BIN / "serve"), "deploy", handle.name, "-a", self.dashboard],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        os.unlink(handle.name)
        if result.returncode:
            raise RuntimeError(f"serve deploy failed: {result.stdout}\n{result.stderr}")

    def health(self) -> dict[str, Any]:
        response = httpx.get(f"{self.api}/health", timeout=10)
        return dict(response.json())

    def app_status(self) -> str:
        result = subprocess.run(
            [str(BIN / "serve"), "status", "-a", self.dashboard],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        status = yaml.safe_load(result.stdout or "{}") or {}
        return str((status.get("applications", {}).get("poolserve") or {}).get("status", "?"))

    async def settled(self, workers: int, timeout_s: float = 900.0) -> float:
        """Wait until the app is RUNNING with `workers` loaded workers and no other; seconds."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            try:
                health = await asyncio.to_thread(self.health)
                status = await asyncio.to_thread(self.app_status)
                loaded = [w for w in health.get("workers", []) if w.get("state") == "ready"]
                if status == "RUNNING" and len(health.get("workers", [])) == len(loaded) == workers:
                    return time.monotonic() - started
            except (httpx.HTTPError, ValueError):
                pass
            await asyncio.sleep(1)
        raise TimeoutError(f"the stack did not settle at {workers} workers in {timeout_s} s")


def base_config() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))


def with_args(config: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    changed = copy.deepcopy(config)
    change(changed["applications"][0]["args"])
    return changed


async def under_load(
    loops: list[ClosedLoop], change: Callable[[], Awaitable[None]], after_s: float
) -> float:
    """Run the loops, apply the change after 10 s, keep loading `after_s` more; the change's
    duration."""
    async with contextlib.AsyncExitStack() as running:
        for loop in loops:
            await running.enter_async_context(loop.running())
        await asyncio.sleep(10)
        started = time.monotonic()
        await change()
        took = time.monotonic() - started
        await asyncio.sleep(after_s)
    return took


def row(name: str, result: LoopResult, took_s: float, note: str = "") -> dict[str, Any]:
    return {"change": name, **result.row(), "change took (s)": round(took_s, 1), "note": note}


async def redeploy(stack: Stack, key: str, value: Any, clients: int) -> dict[str, Any]:
    section, _, name = key.rpartition(".")
    config = with_args(
        base_config(), lambda args: args.setdefault(section, {}).update({name: value})
    )
    loop = ClosedLoop(stack.api, MODEL, clients=clients, max_tokens=64)

    async def change() -> None:
        await asyncio.to_thread(stack.deploy, config)
        await asyncio.sleep(5)  # the controller picks the new config up
        await stack.settled(workers=1)

    took = await under_load([loop], change, after_s=10)
    return row(f"serve deploy, {key}={value}", loop.result, took)


async def pool_delete(stack: Stack, clients: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=stack.api, timeout=60) as client:
        reply = await client.post("/v1/pools", json={"name": POOL, "gpus": {"cpu": 1}})
        reply.raise_for_status()
        started = time.monotonic()
        while time.monotonic() - started < 900:
            pool = (await client.get(f"/v1/pools/{POOL}")).json()
            if pool.get("status", {}).get("state") == "active":
                break
            await asyncio.sleep(2)
        else:
            raise TimeoutError("the pool got no worker")
    pool_loop = ClosedLoop(  # once the pool is gone (404), its clients stop asking for it
        stack.api, MODEL, clients=clients // 2, max_tokens=64, headers={"X-SIE-Pool": POOL},
        stop_on=404,
    )  # fmt: skip
    default_loop = ClosedLoop(stack.api, MODEL, clients=clients - clients // 2, max_tokens=64)

    async def change() -> None:
        async with httpx.AsyncClient(base_url=stack.api, timeout=60) as client:
            (await client.delete(f"/v1/pools/{POOL}")).raise_for_status()
        await stack.settled(workers=1)  # after the cooldown, the extra worker is stopped

    took = await under_load([pool_loop, default_loop], change, after_s=10)
    merged = LoopResult()
    for part in (pool_loop.result, default_loop.result):
        merged.merge(part)
    note = f"{pool_loop.result.stopped} pool clients stopped at 404 after the delete"
    return row("pool deleted mid-stream, then its worker scaled down", merged, took, note)


async def drain_node(clients: int) -> dict[str, Any]:
    """A cluster of its own (`cluster/local-cluster.sh`: a head and two cpu worker nodes on
    127.0.0.1, the cpu profile bound to them by its `profile:cpu` resource); drain the node that
    hosts the Generator."""
    config = base_config()
    config["applications"][0]["args"]["profiles"][0]["resources"] = {"profile:cpu": 1}
    script = str(ROOT / "cluster" / "local-cluster.sh")
    env = {**ENV, "RAY_ADDRESS": "127.0.0.1:6390"}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)

    def run(*command: str) -> str:
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"{' '.join(command)}: {result.stdout}\n{result.stderr}")
        return result.stdout

    try:
        run(script, "start", "--config", handle.name, "--nodes-per-profile", "2")
        stack = Stack("http://127.0.0.1:8000", "http://127.0.0.1:8275", env)
        stack.deploy(config)
        await stack.settled(workers=1)
        node = stack.health()["workers"][0]["node_id"]
        loop = ClosedLoop(stack.api, MODEL, clients=clients, max_tokens=64)

        async def change() -> None:
            await asyncio.to_thread(
                run, str(BIN / "ray"), "drain-node", "--address=127.0.0.1:6390",
                "--node-id", node, "--reason", "DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message", "benchmarks/changes.py", "--deadline-remaining-seconds", "600",
            )  # fmt: skip
            while True:
                workers = (await asyncio.to_thread(stack.health))["workers"]
                moved = [w for w in workers if w["node_id"] != node and w["state"] == "ready"]
                if moved and all(w["node_id"] != node for w in workers):
                    break
                await asyncio.sleep(2)
            await stack.settled(workers=1)

        took = await under_load([loop], change, after_s=10)
        return row("ray drain-node of the Generator's node", loop.result, took)
    finally:
        os.unlink(handle.name)
        subprocess.run([script, "stop"], env=env, cwd=ROOT, capture_output=True, check=False)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    stack = Stack(args.api, args.dashboard, dict(ENV))
    rows: list[dict[str, Any]] = []
    for scenario in args.scenarios.split(","):
        print(f"[changes] {scenario} ...", flush=True)
        if scenario == "redeploy-ingress":
            rows.append(
                await redeploy(stack, "ingress.max_body_bytes", 8 * 1024 * 1024 + 1, args.clients)
            )
        elif scenario == "redeploy-engine":
            rows.append(await redeploy(stack, "kv.max_wait_seconds", 29.0, args.clients))
        elif scenario == "pool-delete":
            rows.append(await pool_delete(stack, args.clients))
        elif scenario == "drain-node":
            rows.append(await drain_node(args.clients))
        else:
            raise SystemExit(f"unknown scenario {scenario}; known: {', '.join(SCENARIOS)}")
        print(json.dumps(rows[-1]), flush=True)
    if "redeploy-ingress" in args.scenarios or "redeploy-engine" in args.scenarios:
        await asyncio.to_thread(stack.deploy, base_config())  # leave the stack as it was
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = [
        "change", "requests", "failed", "streams cut", "retried 429/503",
        "first token p50 (s)", "longest wait (s)", "change took (s)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", default="http://127.0.0.1:8000")
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    started = time.time()
    rows = asyncio.run(main_async(args))
    load = os.getloadavg()
    print(f"\n# changes under load ({args.clients} closed-loop streaming clients)")
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")  # fmt: skip
    print(markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    lost = sum(int(r["failed"]) + int(r["streams cut"]) for r in rows)
    print("\nPASS: no request lost, no stream cut" if not lost else f"\nFAIL: {lost} lost or cut")
    sys.exit(1 if lost else 0)


if __name__ == "__main__":
    main()
