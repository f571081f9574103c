"""The routing decision (app.routing.affinity): affinity keys, rendezvous homes, the prefix
index and the ranking table."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from app.api.openai_routes import routing_text
from app.protocol.generation import GenerationRequest, SamplingOptions
from app.protocol.workers import EngineStats, ModelStatus, WorkerStatus
from app.routing.affinity import (
    BLOCK_CHARS,
    REASONS,
    PrefixIndex,
    WorkerLoad,
    affinity_keys,
    estimated_blocks,
    rank,
    rendezvous_home,
    routing_stats,
    worker_load,
)

MODEL = "org/model"


def request(prompt: str = "", **fields: object) -> GenerationRequest:
    base = GenerationRequest("r1", MODEL, SamplingOptions(max_new_tokens=16), prompt=prompt)
    return dataclasses.replace(base, **fields)  # type: ignore[arg-type]


SYSTEM = "You are a careful assistant. " * 40  # ~1,160 chars: 4 full blocks


class TestAffinityKeys:
    def test_short_prompt_has_no_keys(self) -> None:
        assert affinity_keys(request("hello")) == ()

    def test_one_key_per_full_block_and_equal_prefixes_share_keys(self) -> None:
        a = affinity_keys(request(SYSTEM + "question one"))
        b = affinity_keys(request(SYSTEM + "a different question, longer than the other"))
        assert len(a) == len(SYSTEM + "question one") // BLOCK_CHARS
        shared = len(SYSTEM) // BLOCK_CHARS
        assert a[:shared] == b[:shared]

    def test_a_changed_early_block_changes_every_later_key(self) -> None:
        a = affinity_keys(request(SYSTEM))
        b = affinity_keys(request("X" + SYSTEM[1:]))
        assert not set(a) & set(b)

    def test_model_and_lora_adapter_separate_keys(self) -> None:
        base = affinity_keys(request(SYSTEM))
        assert affinity_keys(request(SYSTEM, model="other/model")) != base
        assert affinity_keys(request(SYSTEM, lora_adapter="demo")) != base

    def test_explicit_keys_win_and_prompt_cache_key_before_routing_key(self) -> None:
        keyed = affinity_keys(request(SYSTEM, prompt_cache_key="session-1"))
        assert len(keyed) == 1
        assert keyed == affinity_keys(request("other", prompt_cache_key="session-1"))
        both = affinity_keys(request("x", prompt_cache_key="a", routing_key="b"))
        assert both == affinity_keys(request("y", prompt_cache_key="a"))
        assert affinity_keys(request("x", routing_key="b")) != both

    def test_chat_turns_key_by_role_and_content(self) -> None:
        def keys(*turns: tuple[str, str]) -> tuple[str, ...]:
            body = {"messages": [{"role": role, "content": text} for role, text in turns]}
            return affinity_keys(request(routing_text("chat", body)))

        as_chat = keys(("system", SYSTEM), ("user", "hi"))
        as_user = keys(("user", SYSTEM), ("user", "hi"))
        assert as_chat and as_user and as_chat[0] != as_user[0]
        parts = {"messages": [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}]}
        assert affinity_keys(request(routing_text("chat", parts)))[0] == as_chat[0]

    def test_estimated_blocks_counts_prompt_budget_and_candidates(self) -> None:
        one = estimated_blocks(request("x" * 4000), block_size=128)
        assert one == -(-(1000 + 16 + 16) // 128)
        wide = request("x" * 4000, sampling=SamplingOptions(max_new_tokens=16, n=2, best_of=3))
        assert estimated_blocks(wide, 128) == one * 3


class TestRendezvous:
    def test_stable_and_moves_few_keys_when_a_worker_joins(self) -> None:
        keys = [f"k{i}" for i in range(2000)]
        before = {k: rendezvous_home(k, ["a", "b"]) for k in keys}
        assert before == {k: rendezvous_home(k, ["b", "a"]) for k in keys}
        after = {k: rendezvous_home(k, ["a", "b", "c"]) for k in keys}
        moved = [k for k in keys if before[k] != after[k]]
        assert all(after[k] == "c" for k in moved)
        assert 0.25 < len(moved) / len(keys) < 0.42
        spread = Counter(before.values())
        assert min(spread.values()) > 900


class TestPrefixIndex:
    def test_match_counts_leading_keys_only(self) -> None:
        index = PrefixIndex()
        index.record("w1", ["a", "b", "c"])
        assert index.match("w1", ["a", "b", "x"]) == 2
        assert index.match("w1", ["x", "a"]) == 0
        assert index.match("w2", ["a"]) == 0

    def test_lru_capacity_forget_and_retain(self) -> None:
        index = PrefixIndex(capacity_per_worker=3)
        index.record("w1", ["a", "b", "c"])
        index.record("w1", ["a"])  # a is fresh again
        index.record("w1", ["d"])  # evicts b, the least recently used
        assert index.match("w1", ["a"]) == 1 and index.match("w1", ["b"]) == 0
        index.record("w2", ["a"])
        index.retain(["w2"])
        assert index.match("w1", ["a"]) == 0 and index.match("w2", ["a"]) == 1
        index.forget("w2")
        assert index.match("w2", ["a"]) == 0


def load(worker: str, ongoing: int = 0, free: int | None = 100, waiting: int = 0) -> WorkerLoad:
    return WorkerLoad(worker, ongoing, free, 128 if free is not None else None, waiting)


KEYS = ("k1", "k2", "k3")


@pytest.mark.parametrize(
    ("workers", "matches", "need", "expected", "reason"),
    [
        # affinity: the worker holding the longest prefix wins despite a little more load
        ([load("a", 3), load("b", 1)], {"a": 3, "b": 1}, 1, "a", "prefix"),
        # ...but not when it is more than max_imbalance (4) above the least loaded
        ([load("a", 6), load("b", 1)], {"a": 3}, 1, "b", "imbalance"),
        # ...nor when it cannot admit the request now and another can
        ([load("a", 0, free=2), load("b", 2)], {"a": 3}, 5, "b", "headroom"),
        # nobody fits: the shortest KV queue
        ([load("a", 0, 1, waiting=3), load("b", 5, 1, waiting=1)], {}, 5, "b", "no_headroom"),
        # unknown stats count as fitting
        ([load("a", 0, free=None), load("b", 0, free=1)], {"b": 3}, 5, "a", "headroom"),
        # equal matches: the less loaded
        ([load("a", 2), load("b", 1)], {"a": 2, "b": 2}, 1, "b", "prefix"),
        # queued-for-KV requests count as load
        ([load("a", 0, waiting=6), load("b", 1)], {"a": 3}, 1, "b", "imbalance"),
    ],
)
def test_ranking_table(
    workers: list[WorkerLoad], matches: dict[str, int], need: int, expected: str, reason: str
) -> None:
    decision = rank(workers, KEYS, matches, {w.worker_id: need for w in workers}, 4)
    assert (decision.chosen, decision.reason) == (expected, reason)
    assert decision.reason in REASONS
    assert sorted(decision.order) == sorted(w.worker_id for w in workers)


def test_no_keys_goes_least_loaded_and_unseen_prefix_goes_home() -> None:
    workers = [load("a", 2), load("b", 0), load("c", 1)]
    assert rank(workers, (), {}, {}, 4).chosen == "b"
    decision = rank(workers, KEYS, {}, {}, 4)
    assert decision.reason == "home"
    assert decision.chosen == rendezvous_home("k1", ["a", "b", "c"])
    assert decision.order[1:] == tuple(w for w in ("b", "c", "a") if w != decision.chosen)


def test_routing_stats_round_trip_into_worker_load() -> None:
    stats = EngineStats(MODEL, 100, 128, 0.1, 2, 2048, kv_blocks_used=30, kv_waiting=2)
    status = WorkerStatus(
        "w1",
        "Generator-cpu",
        "cpu",
        "n",
        "default",
        (
            ModelStatus(MODEL, "loaded", stats=stats),
            ModelStatus("org/loading", "loading"),
        ),
        active_requests=5,
    )
    published = routing_stats(status)
    assert worker_load("w1", 3, published, MODEL) == WorkerLoad("w1", 5, 70, 128, 2, 100)
    assert worker_load("w1", 7, published, MODEL).ongoing == 7
    assert worker_load("w1", 1, published, "org/loading") == WorkerLoad("w1", 5)
    assert worker_load("w1", 1, None, MODEL) == WorkerLoad("w1", 1)
