"""Does a client that leaves stop the engine? On a running stack, each attempt sends one buffered
(non-streamed) request for 1,500 tokens and gives up after `--leave-after-s`; then the engine
processes' CPU (every process named VLLM::..., from /proc) is measured over `--window-s`, 1 s
after the client left. Before the attempts, the same window with no request is the baseline: an
engine that stopped stays near it, one that goes on generating for nobody uses a core or more.
Between attempts it waits until the engine is idle again (a request that was not stopped runs to
its end, ~90 s for the default model on 2 cores).

    .venv/bin/python benchmarks/abandoned.py [--url http://127.0.0.1:8000] [--attempts 6]
        [--route sie|openai]

Run it against `make serve`'s stack, on a quiet machine."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import httpx

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TICKS_PER_S = os.sysconf("SC_CLK_TCK")
IDLE_WAIT_S = 300.0  # a 1,500-token reply takes ~90 s on 2 cores


def engine_cpu_s() -> float:
    """CPU seconds used so far by every VLLM::... process on this machine."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "comm").read_text().startswith("VLLM::"):
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS_PER_S


def engine_share(window_s: float) -> float:
    """The engine's CPU over `window_s`, in cores."""
    before = engine_cpu_s()
    time.sleep(window_s)
    return (engine_cpu_s() - before) / window_s


def request(url: str, route: str) -> tuple[str, dict[str, object]]:
    if route == "sie":
        body = {"prompt": "Write a long story.", "max_new_tokens": 1500, "temperature": 0}
        return f"{url}/v1/generate/{MODEL.replace('/', '__')}", body
    messages = [{"role": "user", "content": "Write a long story."}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 1500, "temperature": 0}
    return f"{url}/v1/chat/completions", body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--attempts", type=int, default=6)
    parser.add_argument("--route", choices=("sie", "openai"), default="sie")
    parser.add_argument("--leave-after-s", type=float, default=2.0)
    parser.add_argument("--window-s", type=float, default=3.0)
    args = parser.parse_args()
    target, body = request(args.url, args.route)
    load = os.getloadavg()[0]
    idle = engine_share(args.window_s)
    print(
        f"{args.route} route, {args.url}, 1-min load {load:.2f}; baseline, no request: "
        f"engine {idle:.2f} cores"
    )
    print("| attempt | answer | engine, cores, 1 s after the client left | stopped? |")
    print("|---|---|---|---|")
    stopped = 0
    for attempt in range(args.attempts):
        try:
            answer = str(httpx.post(target, json=body, timeout=args.leave_after_s).status_code)
        except httpx.TimeoutException:
            answer = f"left after {args.leave_after_s:g} s"
        time.sleep(1.0)
        share = engine_share(args.window_s)
        ok = share < idle + 0.2
        stopped += ok
        print(f"| {attempt} | {answer} | {share:.2f} | {'yes' if ok else '**no**'} |", flush=True)
        deadline = time.monotonic() + IDLE_WAIT_S
        while engine_share(1.0) > idle + 0.2:  # one not stopped runs to its end
            if time.monotonic() > deadline:
                raise SystemExit(f"the engine stayed busy for {IDLE_WAIT_S:g} s: is it quiet?")
    print(f"stopped {stopped} of {args.attempts}")


if __name__ == "__main__":
    main()
