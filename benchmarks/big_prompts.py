"""Big prompts must not stall other clients (issue 16): while streaming clients read tokens from a
running stack, send bodies up to the ingress's body limit on every generation route and record
(a) the status of each (any 5xx fails the run), and (b) the longest gap between two SSE events of
the streaming clients, against a baseline phase without big bodies in the same run.

    make serve    # in another shell, or any running stack
    .venv/bin/python benchmarks/big_prompts.py [--base-url http://127.0.0.1:8000] [--phase-s 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import string
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from app.history import percentile  # noqa: E402
from tests.support.sse import adata  # noqa: E402

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MIB = 1024 * 1024


def words(size: int, seed: int) -> str:
    """`size` bytes of random lowercase words (tokenizes like prose, not like a repeated run)."""
    rng = random.Random(seed)
    pool = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(4096)]
    parts: list[str] = []
    total = 0
    while total < size:
        word = rng.choice(pool)
        parts.append(word)
        total += len(word) + 1
    return " ".join(parts)[:size]


def big_body(route: str, text: str, model: str) -> tuple[str, dict[str, object]]:
    if route == "chat":
        body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": text}]}
        return "/v1/chat/completions", body
    if route == "completions":
        return "/v1/completions", {"model": model, "max_tokens": 1, "prompt": text}
    if route == "responses":
        return "/v1/responses", {"model": model, "max_output_tokens": 16, "input": text}
    if route == "tokenize":
        return "/tokenize", {"model": model, "prompt": text}
    if route == "sie":
        return f"/v1/generate/{model.replace('/', '__')}", {"prompt": text, "max_new_tokens": 1}
    raise ValueError(route)


class Gaps:
    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.streams = 0
        self.failed = 0


async def stream_forever(
    client: httpx.AsyncClient, model: str, stop: asyncio.Event, gaps: Gaps, max_tokens: int
) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    while not stop.is_set():
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    gaps.failed += 1
                    await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                    continue
                last: float | None = None
                async for _ in adata(response):
                    now = time.perf_counter()
                    if last is not None and not stop.is_set():
                        gaps.gaps.append(now - last)
                    last = now
                gaps.streams += 1
        except httpx.HTTPError:
            gaps.failed += 1


async def send_big(
    client: httpx.AsyncClient,
    payloads: list[tuple[str, str, bytes]],
    stop_at: float,
    results: list[dict[str, object]],
    interval_s: float,
    first: int,
) -> None:
    index = first
    while time.perf_counter() < stop_at:
        route, path, payload = payloads[index % len(payloads)]
        index += 1
        started = time.perf_counter()
        try:
            response = await client.post(
                path, content=payload, headers={"content-type": "application/json"}
            )
            status = response.status_code
            try:
                reply = response.json()
                code = (reply.get("error") or reply.get("detail") or {}).get("code")
            except ValueError:
                code = None
        except httpx.HTTPError as error:
            status, code = 0, type(error).__name__
        await asyncio.sleep(interval_s)
        results.append(
            {
                "route": route,
                "bytes": len(payload),
                "status": status,
                "code": code,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )


def senders_process(args: argparse.Namespace, ready: Any, go: Any, out: Any) -> None:
    """The big-body senders, in their own process: building and sending 8 MiB bodies would
    otherwise block the streaming clients' event loop and show up as gaps of the server."""
    sizes = [int(s) for s in args.sizes.split(",")]
    payloads: list[tuple[str, str, bytes]] = []
    for size in sizes:
        text = words(size, seed=size)
        for route in args.routes.split(","):
            path, body = big_body(route, text, args.model)
            payloads.append((route, path, json.dumps(body).encode()))
    ready.set()
    go.wait()

    async def run() -> list[dict[str, object]]:
        results: list[dict[str, object]] = []
        stop_at = time.perf_counter() + args.phase_s
        timeout = httpx.Timeout(300.0)
        async with httpx.AsyncClient(base_url=args.base_url, timeout=timeout) as client:
            await asyncio.gather(
                *(
                    send_big(client, payloads, stop_at, results, args.interval_s, i * 7)
                    for i in range(args.senders)
                )
            )
        return results

    out.put(asyncio.run(run()))


async def phase(
    base_url: str, args: argparse.Namespace, big: bool
) -> tuple[Gaps, list[dict[str, object]]]:
    stop = asyncio.Event()
    gaps = Gaps()
    results: list[dict[str, object]] = []
    timeout = httpx.Timeout(300.0)
    if big:
        context = multiprocessing.get_context("spawn")
        ready, go, out = context.Event(), context.Event(), context.Queue()
        senders = context.Process(target=senders_process, args=(args, ready, go, out))
        senders.start()
        await asyncio.to_thread(ready.wait)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as client:
        tasks = [
            asyncio.create_task(stream_forever(client, args.model, stop, gaps, args.max_tokens))
            for _ in range(args.streams)
        ]
        if big:
            go.set()
        await asyncio.sleep(args.phase_s)
        stop.set()
        if big:
            results = await asyncio.to_thread(out.get)
            senders.join()
        await asyncio.gather(*tasks)
    return gaps, results


def summary(gaps: Gaps) -> dict[str, float]:
    values = sorted(gaps.gaps) or [0.0]
    return {
        "events": len(values),
        "p50_ms": (percentile(values, 50) or 0.0) * 1000,
        "p99_ms": (percentile(values, 99) or 0.0) * 1000,
        "max_ms": values[-1] * 1000,
        "streams": gaps.streams,
        "failed": gaps.failed,
    }


async def main_async(args: argparse.Namespace) -> int:
    base = await phase(args.base_url, args, big=False)
    loaded = await phase(args.base_url, args, big=True)
    before, after = summary(base[0]), summary(loaded[0])
    load = os.getloadavg()
    print(f"# big prompts vs {args.streams} streams, {args.phase_s:.0f} s per phase")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print("| phase | SSE events | gap p50 (ms) | gap p99 (ms) | gap max (ms) | streams | failed |")
    print("|---|---|---|---|---|---|---|")
    for name, row in (("streams alone", before), ("with big bodies", after)):
        print(
            f"| {name} | {row['events']} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
            f"{row['max_ms']:.0f} | {row['streams']} | {row['failed']} |"
        )
    added = after["max_ms"] - before["max_ms"]
    print(f"\nlongest gap added by big bodies: {added:.0f} ms (target <= 100 ms)\n")
    statuses = Counter((r["route"], r["status"], r["code"]) for r in loaded[1])
    print("| route | status | code | count | slowest (s) |")
    print("|---|---|---|---|---|")
    for (route, status, code), count in sorted(statuses.items(), key=str):
        slowest = max(
            float(str(r["seconds"]))
            for r in loaded[1]
            if (r["route"], r["status"], r["code"]) == (route, status, code)
        )
        print(f"| {route} | {status} | {code} | {count} | {slowest:.2f} |")
    bad = [r for r in loaded[1] if not (200 <= int(str(r["status"])) < 500)]
    if args.out:
        Path(args.out).write_text(
            json.dumps({"before": before, "after": after, "big": loaded[1]}, indent=1)
        )
    failures = [
        f"{len(bad)} big bodies got no 2xx/4xx" if bad else "",
        f"a gap grew by {added:.0f} ms" if added > 100 else "",
        f"{before['failed'] + after['failed']:.0f} streams failed"
        if before["failed"] or after["failed"]
        else "",
    ]
    failed = "; ".join(filter(None, failures))
    print(f"\nFAIL: {failed}" if failed else "\nPASS")
    return 1 if failed else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--phase-s", type=float, default=30.0)
    parser.add_argument("--senders", type=int, default=1)
    parser.add_argument(
        "--interval-s", type=float, default=0.0, help="each sender's pause after a reply"
    )
    parser.add_argument(
        "--sizes",
        default=f"{64 * 1024},{MIB},{4 * MIB},{8 * MIB - 4096}",
        help="body sizes in bytes (default up to just under the 8 MiB limit)",
    )
    parser.add_argument("--routes", default="chat,completions,responses,tokenize,sie")
    parser.add_argument("--out", default="")
    sys.exit(asyncio.run(main_async(parser.parse_args())))


if __name__ == "__main__":
    main()
