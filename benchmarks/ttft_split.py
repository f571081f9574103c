"""Where the first token's time goes on a running stack: the client's TTFT against the worker's
own (vLLM call start to first token, the `ttft_ms` of the SIE terminal event), one request at a
time, so the difference is what the proxy, the Ingress and the hops add.

    .venv/bin/python benchmarks/ttft_split.py [--url http://127.0.0.1:8000] [--requests 12]

Run it against `make serve`'s stack on a quiet machine."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.history import percentile
from tests.support.sse import data

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def one(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    first: float | None = None
    terminal: dict[str, float] = {}
    body = {"prompt": prompt, "max_new_tokens": max_tokens, "stream": True}
    with client.stream("POST", f"{url}/v1/generate/{MODEL.replace('/', '__')}", json=body) as r:
        r.raise_for_status()
        for item in data(r):
            if item.startswith("{"):
                first = first or time.perf_counter()
                terminal = json.loads(item)
    assert first is not None and terminal.get("ttft_ms") is not None, terminal
    return (first - started) * 1000, float(terminal["ttft_ms"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--prompt-words", type=int, default=120)
    args = parser.parse_args()
    rows = []
    with httpx.Client(timeout=60) as client:
        for i in range(args.requests + 2):
            prompt = "word " * args.prompt_words + str(i)  # no prefix-cache hit between them
            rows.append(one(client, args.url, prompt, 16))
            time.sleep(0.3)
    rows = rows[2:]  # warm-up
    client_ms = percentile([r[0] for r in rows], 50) or 0.0
    worker_ms = percentile([r[1] for r in rows], 50) or 0.0
    print("| requests | client TTFT p50 ms | worker TTFT p50 ms (baseline) | outside the engine |")
    print("|---|---|---|---|")
    print(f"| {len(rows)} | {client_ms:.1f} | {worker_ms:.1f} | {client_ms - worker_ms:+.1f} ms |")


if __name__ == "__main__":
    main()
