"""The routing decision at scale (app/routing/board.py) decides as the reference functions do:
RoutingBoard.choose as affinity.rank over every worker, TargetIndex.choose as
targets.choose_target, over random sequences of loads, stats, prefixes and snapshots."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from app import errors
from app.config import AppConfig
from app.protocol.generation import GenerationRequest, SamplingOptions
from app.protocol.workers import EngineStats, ModelStatus, WorkerStatus
from app.routing.affinity import (
    PrefixIndex,
    affinity_keys,
    estimated_blocks,
    rank,
    worker_load,
)
from app.routing.board import RoutingBoard, TargetIndex
from app.routing.targets import choose_target

PREFIXES = ["".join(chr(97 + (n * k) % 26) for k in range(600)) for n in range(6)]


def stats(rng: random.Random) -> dict[str, object] | None:
    if rng.random() < 0.2:
        return None
    return {
        "active": rng.randrange(6),
        "kv": {
            "m": {
                "free_blocks": rng.choice([0, 5, 40, 400]),
                "block_size": rng.choice([16, 32]),
                "waiting": rng.randrange(3),
            }
        },
    }


def generation(rng: random.Random, n: int) -> GenerationRequest:
    prompt = rng.choice(PREFIXES)[: rng.choice([100, 300, 600])] + str(rng.random())
    return GenerationRequest(
        f"r{n}", "m", SamplingOptions(max_new_tokens=rng.choice([8, 64, 512])), prompt=prompt
    )


@pytest.mark.parametrize("seed", range(12))
def test_the_board_decides_as_rank_over_every_worker(seed: int) -> None:
    rng = random.Random(seed)
    imbalance = rng.randrange(5)
    board = RoutingBoard(imbalance, prefix_capacity=8)
    reference = PrefixIndex(8)
    raw: dict[str, tuple[int, dict[str, object] | None]] = {}
    groups = [tuple(f"w{k}" for k in range(rng.randrange(1, 30))) for _ in range(3)]
    for n in range(400):
        for _ in range(rng.randrange(4)):
            worker = f"w{rng.randrange(30)}"
            raw[worker] = (rng.randrange(5), stats(rng))
            board.update(worker, *raw[worker])
        ready = rng.choice(groups)
        request = generation(rng, n)
        loads = [worker_load(w, *raw.get(w, (0, None)), "m") for w in ready]
        keys = affinity_keys(request)
        expected = rank(
            loads,
            keys,
            {w: reference.match(w, keys) for w in ready},
            {
                load.worker_id: estimated_blocks(request, load.kv_block_size)
                for load in loads
                if load.kv_block_size
            },
            imbalance,
        )
        reference.record(expected.chosen, keys)
        got = board.choose(ready, request)
        assert (got.chosen, got.reason, got.prefix_match) == (
            expected.chosen,
            expected.reason,
            expected.prefix_match,
        ), n
        if rng.random() < 0.05:
            gone = rng.choice(ready)
            board.forget(gone)
            reference.forget(gone)
            raw.pop(gone, None)


CONFIG = AppConfig.model_validate(
    {
        "models": [{"id": "m", "profiles": ["cpu", "l4"]}],
        "profiles": [{"name": "cpu"}, {"name": "l4", "num_gpus": 1}],
        "worker_stale_seconds": 10,
    }
)


def status(rng: random.Random, n: int, now: float) -> WorkerStatus:
    engine = EngineStats("m", 100, 16, 0.1, 0, 512, max_chars_per_token=4)
    return WorkerStatus(
        worker_id=f"w{n}",
        deployment="d",
        profile=rng.choice(["cpu", "l4"]),
        node_id="n",
        pool="default",
        models=(ModelStatus("m", rng.choice(["loaded", "loaded", "loading"]), stats=engine),),  # type: ignore[arg-type]
        active_requests=0,
        reported_at=now - rng.uniform(0, 14),
    )


def outcome(call: Callable[..., object], *args: object) -> object:
    try:
        return call(*args)
    except errors.ServiceError as error:
        return (type(error), str(error))


@pytest.mark.parametrize("seed", range(6))
def test_the_target_index_chooses_as_choose_target(seed: int) -> None:
    rng = random.Random(seed)
    now = 1000.0
    workers = [status(rng, n, now) for n in range(rng.randrange(1, 12))]
    index = TargetIndex(CONFIG, workers)
    for step in range(60):
        now += rng.uniform(0, 0.5)
        request = GenerationRequest(
            f"r{step}",
            "m",
            SamplingOptions(max_new_tokens=8),
            prompt="x" * rng.choice([10, 5000]),
            machine_profile=rng.choice([None, "cpu", "l4"]),
        )
        assert outcome(index.choose, request, now) == outcome(
            choose_target, CONFIG, workers, request, now
        ), step
