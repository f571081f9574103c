"""The KV-event index's memory and CPU at the sizes of docs/scaling.md, in process (no Ray,
no engine): prints a table.

- `KVBlockIndex` (block key -> workers), as one index of the whole fleet would hold it:
  100 and 1,000 workers x blocks per worker; memory (traced allocations), one BlockStored /
  BlockRemoved block applied, a 64-block prompt's longest cached prefix;
- on each worker (`WorkerKeys`, its own engine only): an event, a prompt's keys mapped, the
  summary an acknowledgement carries (pickled bytes);
- in each ingress replica (`ReportedKeys`): memory at 1,000 workers x 4,096 keys, a summary
  applied, and the whole set fetched after a gap.

    .venv/bin/python benchmarks/kv_index.py [--quick] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.protocol.kv_events import BlockRemoved, BlockStored
from app.routing.kv_hash import block_keys
from app.routing.kv_index import KVBlockIndex
from app.routing.kv_keys import ReportedKeys, WorkerKeys

Row = tuple[str, str, str, str]


def per_op_us(count: int, started: float) -> float:
    return (time.perf_counter() - started) * 1e6 / max(1, count)


def fleet(workers: int, blocks: int, shared: float) -> list[Row]:
    """Every worker holds `blocks` blocks, a `shared` fraction of them common to all (system
    prompts), the rest its own."""
    rng = random.Random(1)
    common = [rng.getrandbits(64) for _ in range(int(blocks * shared))]
    owns = [[rng.getrandbits(64) for _ in range(blocks - len(common))] for _ in range(workers)]
    gc.collect()
    tracemalloc.start()
    index = KVBlockIndex()
    for worker, own in enumerate(owns):
        index.stored(f"w{worker:04d}", common + own)
    grown = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    spare = KVBlockIndex()
    started = time.perf_counter()
    for worker, own in enumerate(owns[: max(1, workers // 10)]):
        spare.stored(f"w{worker:04d}", common + own)
    store_us = per_op_us(max(1, workers // 10) * blocks, started)
    del spare, owns
    # steady state: one block evicted and one stored per event, on random workers
    ops = 200_000
    started = time.perf_counter()
    for _ in range(ops // 2):
        worker = f"w{rng.randrange(workers):04d}"
        key = rng.getrandbits(64)
        index.apply(worker, BlockStored((key,), None))
        index.apply(worker, BlockRemoved((key,)))
    event_us = per_op_us(ops, started)
    chain = common[:64] if len(common) >= 64 else [*common, rng.getrandbits(64)]
    lookups = 2_000
    started = time.perf_counter()
    for _ in range(lookups):
        index.matches(chain)
    match_us = per_op_us(lookups, started)
    scale = f"{workers:,} workers x {blocks:,} blocks ({shared:.0%} shared)"
    return [
        (
            "fleet index: memory",
            scale,
            f"{grown / 2**20:,.0f} MiB",
            f"{grown / (workers * blocks):.0f} B per block held",
        ),
        ("fleet index: a block stored (initial fill)", scale, f"{store_us:.2f} us", ""),
        ("fleet index: one block event (stored or removed)", scale, f"{event_us:.2f} us", ""),
        (
            "fleet index: longest prefix of a 64-block prompt, every holder",
            scale,
            f"{match_us:.0f} us",
            f"{len(index.holders(chain[0])):,} holders",
        ),
    ]


def worker_side(blocks: int) -> list[Row]:
    keys = WorkerKeys("bench", capacity=4096)
    rng = random.Random(2)
    tokens = list(range(2048))
    started = time.perf_counter()
    hashes = 200
    for _ in range(hashes):
        block_keys(tokens, 16)
    hash_us = per_op_us(hashes, started)
    chain = block_keys(tokens, 16)  # 128 blocks
    texts = [f"{i:016x}" for i in range(32)]
    started = time.perf_counter()
    prompts = 5_000
    for i in range(prompts):
        chain_i = [rng.getrandbits(64) for _ in range(8)] + chain[:120]
        keys.prompt([f"{i}:{t}" for t in texts], 8192, chain_i, 2048, 16)
        keys.apply(BlockStored(tuple(chain_i), None))
        if keys.cached_blocks > blocks:
            keys.apply(BlockRemoved(tuple(chain_i[:8])))
    per_prompt = per_op_us(prompts, started)
    summary = pickle.dumps(keys.summary())
    full = pickle.dumps(keys.full())
    scale = f"1 worker, {blocks:,} blocks, 4,096 keys"
    return [
        (
            "worker: vLLM block hashes of a 2,048-token prompt (128 blocks)",
            "-",
            f"{hash_us:.0f} us",
            "sha256 x 128",
        ),
        (
            "worker: a prompt's 32 keys mapped + its BlockStored (+ an eviction)",
            scale,
            f"{per_prompt:.0f} us",
            "",
        ),
        (
            "worker: summary on each acknowledgement (last 256 changes)",
            scale,
            f"{len(summary):,} B",
            "pickled",
        ),
        ("worker: whole held set (after a gap)", scale, f"{len(full):,} B", "pickled"),
    ]


def ingress_side(workers: int, keys_per_worker: int) -> list[Row]:
    rng = random.Random(3)
    producers = [WorkerKeys(f"e{w}", capacity=keys_per_worker) for w in range(1)]
    sets = [[f"{rng.getrandbits(64):016x}" for _ in range(keys_per_worker)] for _ in range(workers)]
    gc.collect()
    tracemalloc.start()
    view = ReportedKeys()
    for worker, held in enumerate(sets):
        view.apply(f"w{worker:04d}", "m", ["e", 1, None, held])
    grown = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    started = time.perf_counter()
    for worker, held in enumerate(sets[:20]):
        view.apply(f"w{worker:04d}", "m", ["e2", 1, None, held])  # a new epoch: replaced
    fill_us = per_op_us(20, started)
    del sets
    # a summary of 256 changes, of which 16 new since this replica's last one
    producer = producers[0]
    chain = list(range(64))
    for i in range(300):
        producer.prompt([f"k{i}"], 256, chain, 16, 16)  # -> block 0
        producer.apply(BlockStored((chain[0],), None) if i % 2 else BlockRemoved((chain[0],)))
    summary = producer.summary()
    applies = 2_000
    elapsed = 0.0
    for i in range(applies):
        worker = f"x{i}"
        view.apply(worker, "m", [summary[0], summary[1] - 16, None, []])
        started = time.perf_counter()
        view.apply(worker, "m", summary)
        elapsed += time.perf_counter() - started
    apply_us = elapsed * 1e6 / applies
    assert view.held_count(f"x{applies - 1}") > 0, "the summary was not applied"
    repeat = 100_000
    started = time.perf_counter()
    for _ in range(repeat):
        view.apply("x0", "m", summary)
    seen_us = per_op_us(repeat, started)
    scale = f"{workers:,} workers x {keys_per_worker:,} keys"
    return [
        (
            "ingress: memory of every worker's held keys",
            scale,
            f"{grown / 2**20:,.0f} MiB",
            f"{grown / (workers * keys_per_worker):.0f} B per key (+ the 65 B key strings)",
        ),
        (
            "ingress: a whole set applied (after a gap or a restart)",
            f"{keys_per_worker:,} keys",
            f"{fill_us / 1000:.2f} ms",
            "",
        ),
        ("ingress: a summary applied (16 new changes of 256)", scale, f"{apply_us:.1f} us", ""),
        ("ingress: a summary already seen (every load update)", scale, f"{seen_us:.2f} us", ""),
    ]


def decision(workers: int) -> list[Row]:
    """A routing decision on the board over the engines' reports (`RoutingBoard` with
    `ReportedKeys`), a 16 KiB prompt (64 keys) whose first 32 keys 10 workers hold."""
    from app.protocol.generation import GenerationRequest, SamplingOptions
    from app.routing.affinity import affinity_keys
    from app.routing.board import RoutingBoard

    board = RoutingBoard(max_imbalance=4, kv_events=True)
    ready = tuple(f"w{w:04d}" for w in range(workers))
    request = GenerationRequest("r", "m", SamplingOptions(max_new_tokens=16), prompt="y" * 16384)
    keys = list(affinity_keys(request))
    for number, worker in enumerate(ready):
        held = keys[:32] if number < 10 else [f"{number}:{i}" for i in range(64)]
        stats = {
            "active": number % 7,
            "kv": {
                "m": {
                    "free_blocks": 1000,
                    "block_size": 16,
                    "waiting": 0,
                    "keys": ["e", 1, None, held],
                }
            },
        }
        board.update(worker, 0, stats)
    for _ in range(50):
        board.choose(ready, request)
    rounds = 2_000
    samples = []
    for i in range(rounds):
        started = time.perf_counter()
        board.choose(ready, request)
        samples.append(time.perf_counter() - started)
        board.update(ready[i % workers], i % 5, None)  # loads move between decisions
    samples.sort()
    p50, p99 = samples[len(samples) // 2] * 1e6, samples[int(len(samples) * 0.99)] * 1e6
    return [
        (
            "ingress: routing decision on the engines' reports (64 keys, 10 holders)",
            f"{workers:,} workers",
            f"p50 {p50:.0f} us, p99 {p99:.0f} us",
            "target <= 500 us p50 (issue 29)",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="100 workers only")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    load_start = os.getloadavg()
    rows: list[Row] = []
    rows += fleet(100, 16_384, 0.05)  # 16-token blocks: 256k tokens of KV per worker
    if not args.quick:
        rows += fleet(1_000, 4_096, 0.05)
    rows += worker_side(16_384)
    rows += ingress_side(100 if args.quick else 1_000, 4_096)
    rows += decision(100 if args.quick else 1_000)
    load_end = os.getloadavg()
    lines = [
        f"load average at start {load_start[0]:.2f} / {load_start[1]:.2f} / {load_start[2]:.2f}, "
        f"at end {load_end[0]:.2f} / {load_end[1]:.2f} / {load_end[2]:.2f}",
        "",
        "| what | scale | measured | |",
        "|---|---|---|---|",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows),
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
