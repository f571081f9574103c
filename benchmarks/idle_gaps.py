"""Requests after idle gaps just under the ingress's SNAPSHOT_STALE_SECONDS (5 s): counts the
answers by status. Before 8b7578e about a quarter were 503 PROVISIONING (the worker judged by
heartbeat times up to ~12 s old); the answer must be 200 every time.

    make serve    # or any running stack
    .venv/bin/python benchmarks/idle_gaps.py [--base-url http://127.0.0.1:8000] [--requests 40]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
import urllib.error
import urllib.request
from collections import Counter

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--gap", default="4.5,4.95", help="idle seconds between requests: lo,hi")
    args = parser.parse_args()
    low, high = (float(x) for x in args.gap.split(","))
    body = json.dumps({"model": MODEL, "prompt": "Hi", "max_tokens": 2}).encode()
    codes: Counter[int] = Counter()
    for _ in range(args.requests):
        request = urllib.request.Request(
            f"{args.base_url}/v1/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                codes[response.status] += 1
        except urllib.error.HTTPError as error:
            codes[error.code] += 1
        time.sleep(random.uniform(low, high))
    print(f"answers after idle gaps of {low:g}-{high:g} s: {dict(codes)}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
