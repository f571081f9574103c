"""The KV-event index: vLLM's block hashes reproduced, blocks per worker from BlockStored /
BlockRemoved / AllBlocksCleared, longest cached prefixes, and the affinity keys a worker's
cache holds as the ingress replicas see them."""

from __future__ import annotations

from app.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from app.routing.kv_hash import block_hashes, block_key, block_keys
from app.routing.kv_index import KVBlockIndex
from app.routing.kv_keys import LOG_KEPT, ReportedKeys, WorkerKeys, key_block

# vllm.v1.core.kv_cache_utils.hash_block_tokens(sha256, ...) of vLLM 0.32 with its default
# seed, on tokens 1000..1039 in blocks of 16 (computed once with vLLM itself)
VLLM_HASHES = [
    "9d9c413731095d0ee811a14814414907cafccd751ce2052f659e8e1f547aeb68",
    "6eab5151ee783ec014728198ae09f5b0c20f18673ff098bcec4f29beb1e71e61",
]


def test_block_hashes_are_vllms():
    hashes = block_hashes(list(range(1000, 1040)), 16)
    assert [h.hex() for h in hashes] == VLLM_HASHES  # only the 2 full blocks
    assert block_keys(list(range(1000, 1040)), 16) == [block_key(h) for h in hashes]
    # vLLM's int form (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES): the low 64 bits
    assert block_key(hashes[0]) == int(VLLM_HASHES[0], 16) & ((1 << 64) - 1)
    assert block_key(int(VLLM_HASHES[0], 16)) == block_key(hashes[0])


def test_block_hashes_chain_and_seed():
    a = block_keys([1] * 32 + [2] * 16, 16)
    b = block_keys([1] * 32 + [3] * 16, 16)
    assert a[:2] == b[:2] and a[2] != b[2]
    assert a[0] != a[1]  # the parent is folded in
    assert block_keys([1] * 16, 16, seed="0") != block_keys([1] * 16, 16)


def test_store_remove_clear_per_worker():
    index = KVBlockIndex()
    index.apply("a", BlockStored((1, 2, 3), None))
    index.apply("b", BlockStored((1, 2), None))
    assert index.holders(1) == {"a", "b"} and index.holders(3) == {"a"}
    assert index.matches([1, 2, 3, 4]) == {"a": 3, "b": 2}
    index.apply("a", BlockRemoved((2,)))
    assert index.longest_prefix("a", [1, 2, 3]) == 1
    assert index.holders(2) == {"b"}
    index.apply("b", AllBlocksCleared())
    assert index.holders(1) == {"a"} and index.cached_blocks("b") == 0
    assert index.matches([2]) == {}
    assert len(index) == 2  # blocks 1 and 3, held by a


def test_replayed_events_are_idempotent():
    """A subscriber that catches up through the replay endpoint may see events twice."""
    index = KVBlockIndex()
    events = [BlockStored((1, 2), None), BlockRemoved((2,)), BlockStored((2, 5), 1)]
    for event in events + events:
        index.apply("a", event)
    assert index.cached_blocks("a") == 3 and index.longest_prefix("a", [1, 2, 5]) == 3


def test_a_worker_leaving_takes_its_blocks():
    index = KVBlockIndex()
    index.stored("a", [1, 2])
    index.stored("b", [1])
    index.forget("a")
    assert index.holders(1) == {"b"} and index.holders(2) == frozenset()
    assert index.workers() == ["b"]
    index.removed("gone", [1])  # unknown worker: nothing happens
    assert index.holders(1) == {"b"}


def test_key_block_maps_text_share_to_token_block():
    # 1,024 characters, 256 tokens, blocks of 16: the key of the first 256 chars -> block 3
    assert key_block(0, 1024, 256, 16, 16) == 3
    assert key_block(3, 1024, 256, 16, 16) == 15
    assert key_block(0, 1024, 40, 16, 2) == -1  # a quarter of 40 tokens: no full block
    assert key_block(9, 1024, 256, 16, 16) == 15  # never past the last full block


def _worker_with_prompt() -> tuple[WorkerKeys, list[int]]:
    worker = WorkerKeys("e1")
    chain = block_keys(list(range(256)), 16)
    assert worker.prompt(["k0", "k1", "k2", "k3"], 1024, chain, 256, 16) == 0
    return worker, chain


def test_worker_keys_follow_the_engines_events():
    worker, chain = _worker_with_prompt()
    assert worker.held() == set()  # nothing cached yet
    worker.apply(BlockStored(tuple(chain), None))
    assert worker.held() == {"k0", "k1", "k2", "k3"} and worker.cached_blocks == 16
    worker.apply(BlockRemoved((chain[15],)))
    assert worker.held() == {"k0", "k1", "k2"}
    # a second request of the same prompt finds 15 leading blocks cached
    assert worker.prompt(["k0", "k1", "k2", "k3"], 1024, chain, 256, 16) == 15
    assert (worker.prompt_blocks, worker.matched_blocks) == (32, 15)
    worker.apply(AllBlocksCleared())
    assert worker.held() == set() and worker.cached_blocks == 0


def test_ingress_replicas_apply_summaries_and_fetch_after_a_gap():
    worker, chain = _worker_with_prompt()
    early, late = ReportedKeys(), ReportedKeys()
    assert not early.apply("w", "m", worker.summary())
    worker.apply(BlockStored(tuple(chain), None))
    assert not early.apply("w", "m", worker.summary())
    assert early.match("w", ["k0", "k1", "k2", "k3", "k4"]) == 4
    assert early.holders("k0") == {"w"}
    worker.apply(BlockRemoved((chain[7],)))  # k1 (block 7) goes
    assert not early.apply("w", "m", worker.summary())
    assert not early.apply("w", "m", worker.summary())  # the same summary again: no change
    assert early.match("w", ["k0", "k1"]) == 1
    # a replica that started late saw every change from the start in the log: no fetch
    assert not late.apply("w", "m", worker.summary())
    assert late.match("w", ["k0"]) == 1
    # more changes than one summary carries: a gap, then the whole set mends it
    for round_ in range(LOG_KEPT + 10):
        worker.apply(BlockRemoved((chain[3],)) if round_ % 2 else BlockStored((chain[3],), None))
    assert early.apply("w", "m", worker.summary())
    assert not early.apply("w", "m", worker.full())
    assert {k for k in ("k0", "k1", "k2", "k3") if early.match("w", [k])} == worker.held()


def test_a_restarted_worker_is_a_new_epoch():
    worker, chain = _worker_with_prompt()
    worker.apply(BlockStored(tuple(chain), None))
    view = ReportedKeys()
    view.apply("w", "m", worker.summary())
    restarted = WorkerKeys("e2")
    restarted.prompt(["k9"], 256, block_keys(list(range(64)), 16), 64, 16)
    restarted.apply(BlockStored(tuple(block_keys(list(range(64)), 16)), None))
    assert not view.apply("w", "m", restarted.summary())  # its log starts at 0: all of it
    assert view.apply("w", "m", restarted.summary()) is False
    assert not view.apply("w", "m", restarted.full())
    assert view.match("w", ["k0"]) == 0 and view.match("w", ["k9"]) == 1
    view.forget("w")
    assert view.holders("k9") == frozenset() and view.held_count("w") == 0


def _board_stats(summary: list[object], free: int = 100) -> dict[str, object]:
    return {
        "active": 0,
        "kv": {"m": {"free_blocks": free, "block_size": 16, "waiting": 0, "keys": summary}},
    }


def test_the_board_routes_on_what_the_engines_report() -> None:
    from app.protocol.generation import GenerationRequest, SamplingOptions
    from app.routing.affinity import affinity_keys
    from app.routing.board import RoutingBoard

    request = GenerationRequest("r", "m", SamplingOptions(max_new_tokens=4), prompt="x" * 1024)
    keys = affinity_keys(request)
    chain = block_keys(list(range(256)), 16)
    a, b = WorkerKeys("ea"), WorkerKeys("eb")
    for worker in (a, b):
        worker.prompt(keys, 1024, chain, 256, 16)
    a.apply(BlockStored(tuple(chain[:8]), None))  # a holds the first half
    b.apply(BlockStored(tuple(chain), None))  # b the whole prompt
    board = RoutingBoard(max_imbalance=4, kv_events=True)
    board.update("a", 0, _board_stats(a.summary()))
    board.update("b", 0, _board_stats(b.summary()))
    ready = ("a", "b")
    decision = board.choose(ready, request)
    assert (decision.chosen, decision.reason, decision.prefix_match) == ("b", "prefix", 4)
    # b's engine evicts the prompt: the next acknowledgement says so, a is the better holder
    b.apply(BlockRemoved(tuple(chain)))
    board.update("b", 0, _board_stats(b.summary()))
    decision = board.choose(ready, request)
    assert (decision.chosen, decision.reason, decision.prefix_match) == ("a", "prefix", 2)
    assert not board.wanted
    # a replica that missed more changes than a summary carries wants the whole set
    for round_ in range(LOG_KEPT + 1):
        a.apply(BlockRemoved((chain[3],)) if round_ % 2 == 0 else BlockStored((chain[3],), None))
    board.update("a", 0, _board_stats(a.summary()))
    assert board.wanted == {("a", "m")}
    board.forget("a")
    assert board.choose(ready, request).reason == "room"  # held nowhere now: placed by room
