"""The routing decision at scale (app/routing/board.py) decides as the reference functions do:
RoutingBoard.choose as affinity.rank over every worker, TargetIndex.choose as
targets.choose_target, over random sequences of loads, stats, prefixes and snapshots."""

from __future__ import annotations

import random
from collections import Counter
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
from app.routing.kv_keys import ReportedKeys
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
    # a shared prefix, then a session's own text (a few sessions, so some repeat), of lengths
    # that make cached runs of every share of the prompt
    session = str(rng.randrange(8)) * rng.choice([0, 300, 900])
    prompt = rng.choice(PREFIXES)[: rng.choice([100, 300, 600])] + session + str(rng.random())
    return GenerationRequest(
        f"r{n}", "m", SamplingOptions(max_new_tokens=rng.choice([8, 64, 512])), prompt=prompt
    )


@pytest.mark.parametrize("seed", range(12))
def test_the_board_decides_as_rank_over_every_worker(seed: int) -> None:
    rng = random.Random(seed)
    imbalance = rng.randrange(5)
    threshold = rng.choice([0.0, 0.5, 0.9])
    board = RoutingBoard(imbalance, prefix_capacity=8, prefix_threshold=threshold)
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
            threshold,
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


@pytest.mark.parametrize("kv_events", [False, True])
def test_sessions_behind_a_shared_system_prompt_spread_and_keep_their_worker(
    kv_events: bool,
) -> None:
    """Every session starts with the same system prompt: a worker that cached only that is no
    reason to send it a new session (it would get them all); a session's next turn, cached
    for most of its prompt, goes back where its first went."""
    system = "You are a precise assistant. Answer only from the document. " * 6
    docs = [" ".join(f"w{session}x{k}" for k in range(250)) for session in range(20)]

    def turn(session: int, n: int) -> GenerationRequest:
        prompt = f"{system}\n{docs[session]}\nQuestion {n}"
        return GenerationRequest(
            f"s{session}t{n}", "m", SamplingOptions(max_new_tokens=8), prompt=prompt
        )

    def placements(threshold: float) -> tuple[Counter[str], int]:
        board = RoutingBoard(4, kv_events=kv_events, prefix_threshold=threshold)
        ready = ("a", "b")
        first: dict[int, str] = {}
        held: dict[str, set[str]] = {"a": set(), "b": set()}
        for session in range(20):
            chosen = board.choose(ready, turn(session, 0)).chosen
            first[session] = chosen
            if kv_events:  # what the engine reports once it cached the prompt: all of it
                held[chosen].update(affinity_keys(turn(session, 0)))
                summary = ["epoch", session + 1, None, sorted(held[chosen])]
                assert isinstance(board.index, ReportedKeys)
                board.index.apply(chosen, "m", summary)
        back = sum(board.choose(ready, turn(s, 1)).chosen == first[s] for s in range(20))
        return Counter(first.values()), back

    spread, back = placements(0.5)
    assert min(spread["a"], spread["b"]) >= 5, spread
    assert back == 20
    # following any cached prefix: the first worker gets every session
    assert placements(0.0)[0].most_common(1)[0][1] == 20


@pytest.mark.parametrize("threshold", [-0.1, 1.5, "half"])
def test_a_prefix_threshold_outside_0_to_1_is_refused(threshold: object) -> None:
    with pytest.raises(ValueError, match="prefix_threshold"):
        AppConfig.model_validate(
            {
                "models": [{"id": "m", "source": "embedded:smollm2"}],
                "routing": {"prefix_threshold": threshold},
            }
        )
