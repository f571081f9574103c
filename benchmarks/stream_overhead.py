"""Serving overhead with a null engine (tokens appear instantly): streamed tokens/s and time to
the first chunk through Ray Serve streaming handles, for 1 and 64 concurrent streams, each its
own call to `Generator.generate` (a group of one request). The baseline, in the same run, is
one Ray object per token (coalescing off).

    .venv/bin/python benchmarks/stream_overhead.py [--tokens-per-stream 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.local_serve import start_local_serve, stop_local_serve  # noqa: I001 - env first

from app.builder import build_app
from app.errors import ServiceError
from app.history import percentile
from app.protocol.generation import GenerationRequest, SamplingOptions

MODEL = "null/model"
VARIANTS = {"per-token (baseline)": (0.0, 1), "coalesced 10 ms": (10.0, 256)}


def app_args(window_ms: float, max_chunks: int) -> dict[str, object]:
    return {
        "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
        "models": [
            {
                "id": MODEL,
                "engine": {"extra_args": {"kv_blocks": 100_000, "max_model_len": 100_000}},
            }
        ],
        "profiles": [{"name": "cpu", "num_cpus": 0, "max_ongoing_requests": 256}],
        "streaming": {"coalesce_window_ms": window_ms, "coalesce_max_chunks": max_chunks},
        "kv": {"max_waiting_requests": 1000},
    }


async def one_stream(handle: object, tokens: int) -> tuple[float, int, int]:
    request = GenerationRequest(
        request_id=uuid.uuid4().hex,
        model=MODEL,
        prompt="x",
        sampling=SamplingOptions(max_new_tokens=tokens),
    )
    started = time.perf_counter()
    first = None
    objects = chunks = 0
    # a call carries a group of requests (here one): the first message acknowledges it, each
    # message after carries the items ready then, by request id (app/deployments/calls.py)
    async for _stats, items in handle.generate.remote([request]):  # type: ignore[attr-defined]
        if not items:
            continue
        if first is None:
            first = time.perf_counter() - started
        objects += 1
        for _request_id, item in items:
            if isinstance(item, ServiceError):
                raise item
            chunks += len(item or ())
    return first or 0.0, objects, chunks


async def measure(handle: object, streams: int, tokens_per_stream: int) -> dict[str, float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(one_stream(handle, tokens_per_stream) for _ in range(streams)))
    elapsed = time.perf_counter() - started
    firsts = sorted(result[0] for result in results)
    return {
        "tokens_per_s": streams * tokens_per_stream / elapsed,
        "objects_per_s": sum(result[1] for result in results) / elapsed,
        "first_p50_ms": (percentile(firsts, 50) or 0.0) * 1000,
        "tokens_per_object": sum(r[2] for r in results) / max(1, sum(r[1] for r in results)),
    }


def main() -> None:
    from ray import serve

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens-per-stream", type=int, default=1000)
    args = parser.parse_args()
    start_local_serve()
    rows = []
    try:
        for name, (window_ms, max_chunks) in VARIANTS.items():
            app_name = "bench-" + str(abs(hash(name)))
            serve.run(
                build_app(app_args(window_ms, max_chunks)),
                name=app_name,
                route_prefix="/" + app_name,
            )
            handle = serve.get_deployment_handle("Generator-cpu", app_name=app_name).options(
                stream=True
            )
            time.sleep(3)  # first heartbeat; the fake loads instantly
            asyncio.run(measure(handle, 1, 200))  # warm-up
            for streams in (1, 64):
                result = asyncio.run(measure(handle, streams, args.tokens_per_stream))
                rows.append((name, streams, result))
            serve.delete(app_name)
    finally:
        stop_local_serve()
    print(
        f"\n{'variant':<22}{'streams':>8}{'tokens/s':>12}{'objects/s':>11}{'tok/object':>11}{'first p50 ms':>14}"
    )
    for name, streams, result in rows:
        print(
            f"{name:<22}{streams:>8}{result['tokens_per_s']:>12.0f}{result['objects_per_s']:>11.0f}"
            f"{result['tokens_per_object']:>11.1f}{result['first_p50_ms']:>14.1f}"
        )
    baseline = {streams: result for name, streams, result in rows if name.startswith("per-token")}
    for name, streams, result in rows:
        if not name.startswith("per-token"):
            ratio = result["tokens_per_s"] / baseline[streams]["tokens_per_s"]
            print(f"{name} vs per-token at {streams} stream(s): {ratio:.1f}x tokens/s")


if __name__ == "__main__":
    main()
