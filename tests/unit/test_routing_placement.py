"""Placing a prefix no engine holds by cache room (`RoutingBoard` with KV events): where the
cache has room, remembered until the engine's events report it, again by room after an
eviction, guarded by load and headroom; without events, the rendezvous home as before."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from app.protocol.generation import GenerationRequest, SamplingOptions
from app.protocol.kv_events import BlockRemoved, BlockStored
from app.routing.affinity import affinity_keys, rendezvous_home
from app.routing.board import RoutingBoard
from app.routing.kv_hash import block_keys
from app.routing.kv_keys import SENT_SECONDS, WorkerKeys

MODEL = "m"
BLOCK = 128  # vLLM's CPU block: the first keys of a prompt are shorter than a block
SYSTEM = "You are a precise assistant. Answer only from the document. " * 6
SYSTEM_TOKENS = 80


def prompt(session: int, turn: int) -> str:
    """The routing benchmark's turns: a shared system prompt, the session's document, a
    question (the same ~3,300 characters, ~560 tokens, every turn)."""
    document = " ".join(f"s{session}w{i % 97}" for i in range(420))
    return f"{SYSTEM}\n{document}\nQuestion {turn}: name a word from the document."


def tokens(session: int, turn: int) -> list[int]:
    own = [100_000 * (session + 1) + i for i in range(460)]
    return list(range(SYSTEM_TOKENS)) + own + [7, turn]


def request(session: int, turn: int, max_new_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(
        f"r{session}-{turn}",
        MODEL,
        SamplingOptions(max_new_tokens=max_new_tokens),
        prompt=prompt(session, turn),
    )


@dataclass
class Engine:
    """A worker's engine as its routers see it: its prompts mapped to blocks, its events."""

    worker: str
    total_blocks: int = 68
    keys: WorkerKeys = field(default_factory=lambda: WorkerKeys("e"))
    active: int = 0

    def prompt(self, session: int, turn: int) -> list[int]:
        ids = tokens(session, turn)
        chain = block_keys(ids, BLOCK)
        text = prompt(session, turn)
        self.keys.prompt(affinity_keys(request(session, turn)), len(text), chain, len(ids), BLOCK)
        return chain

    def store(self, session: int, turn: int = 0) -> None:
        self.keys.apply(BlockStored(tuple(self.prompt(session, turn)), None))

    def evict(self, session: int, turn: int = 0) -> None:
        self.keys.apply(BlockRemoved(tuple(block_keys(tokens(session, turn), BLOCK))))

    def stats(self, free_blocks: int | None = None) -> dict[str, object]:
        kv = {
            "free_blocks": self.total_blocks if free_blocks is None else free_blocks,
            "total_blocks": self.total_blocks,
            "block_size": BLOCK,
            "waiting": 0,
            "keys": self.keys.summary(),
        }
        return {"active": self.active, "kv": {MODEL: kv}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def board_of(*engines: Engine, clock: Clock | None = None) -> RoutingBoard:
    board = RoutingBoard(max_imbalance=4, kv_events=True, clock=clock or Clock())
    report(board, *engines)
    return board


def report(board: RoutingBoard, *engines: Engine, **stats: int) -> None:
    """The acknowledgement of a call to each engine reaches the board."""
    for engine in engines:
        board.update(engine.worker, 0, engine.stats(**stats))


def test_the_first_keys_of_a_prompt_are_never_held_with_large_blocks() -> None:
    """Why the board looks past them: the shared system prompt's key covers less than one
    128-token block, so no engine ever reports it, and a session's own keys start after it."""
    a = Engine("a")
    a.store(0)
    keys = affinity_keys(request(0, 0))
    assert keys[0] == affinity_keys(request(1, 0))[0]  # the shared system prompt
    assert keys[0] not in a.keys.held() and keys[-1] in a.keys.held()


def test_a_session_follows_the_engine_that_holds_it_past_its_unheld_first_keys() -> None:
    a, b = Engine("a"), Engine("b")
    b.store(3)
    decision = board_of(a, b).choose(("a", "b"), request(3, 1))
    assert (decision.chosen, decision.reason) == ("b", "prefix")
    assert decision.prefix_match == len(affinity_keys(request(3, 1)))


def test_a_prefix_no_engine_holds_goes_where_the_cache_has_room() -> None:
    a, b = Engine("a"), Engine("b")
    for session in range(3):
        a.store(session)
    board = board_of(a, b)
    decision = board.choose(("a", "b"), request(7, 0))
    assert (decision.chosen, decision.reason, decision.prefix_match) == ("b", "room", 0)
    # and whichever way round the ready workers come
    assert board_of(a, b).choose(("b", "a"), request(7, 0)).chosen == "b"


def test_new_sessions_fill_both_caches_evenly() -> None:
    """Each new session goes where there is room, its events arriving before the next one."""
    engines = {"a": Engine("a"), "b": Engine("b")}
    board = board_of(*engines.values())
    placed = {"a": 0, "b": 0}
    for session in range(20):
        chosen = board.choose(("a", "b"), request(session, 0)).chosen
        engines[chosen].store(session)
        placed[chosen] += 1
        report(board, engines[chosen])
    assert abs(placed["a"] - placed["b"]) <= 2, placed


def test_a_shared_system_prompt_does_not_chain_new_sessions_together() -> None:
    a, b = Engine("a"), Engine("b")
    board = board_of(a, b)
    first = board.choose(("a", "b"), request(0, 0))
    # no events yet: the next session shares only the system prompt, it is placed on its own
    assert board.choose(("a", "b"), request(1, 0)).reason == "room"
    assert first.reason == "room"


def test_the_next_turn_follows_the_first_until_the_events_arrive() -> None:
    a, b = Engine("a"), Engine("b")
    board = board_of(a, b)
    first = board.choose(("a", "b"), request(5, 0))
    assert first.reason == "room"
    here, there = (a, b) if first.chosen == "a" else (b, a)
    # meanwhile the chosen engine filled up with other sessions: room now points away ...
    for session in range(10, 16):
        here.store(session)
    report(board, here)
    assert board.choose(("a", "b"), request(6, 0), record=False).chosen == there.worker
    # ... but the session's next turn, routed before its own blocks are reported, follows it
    second = board.choose(("a", "b"), request(5, 1))
    assert (second.chosen, second.reason) == (here.worker, "prefix")
    # its blocks are reported: the engine's record speaks for it from now on
    here.store(5)
    report(board, here)
    assert board.choose(("a", "b"), request(5, 2)).chosen == here.worker


def test_after_an_eviction_the_session_goes_where_there_is_room_not_back() -> None:
    a, b = Engine("a"), Engine("b")
    board = board_of(a, b)
    first = board.choose(("a", "b"), request(5, 0)).chosen
    here, there = (a, b) if first == "a" else (b, a)
    here.store(5)
    for session in range(10, 16):
        here.store(session)  # a busy cache ...
    report(board, here)
    assert board.choose(("a", "b"), request(5, 1)).chosen == here.worker
    here.evict(5)  # ... that evicted the session
    report(board, here)
    decision = board.choose(("a", "b"), request(5, 2))
    assert (decision.chosen, decision.reason) == (there.worker, "room")


def test_the_remembered_choice_lasts_only_while_the_events_may_be_on_their_way() -> None:
    clock = Clock()
    a, b = Engine("a"), Engine("b")
    board = board_of(a, b, clock=clock)
    here = {"a": a, "b": b}[board.choose(("a", "b"), request(5, 0)).chosen]
    for session in range(10, 16):
        here.store(session)
    report(board, here)
    clock.now += SENT_SECONDS / 2
    assert board.choose(("a", "b"), request(5, 1), record=False).reason == "prefix"
    clock.now += SENT_SECONDS  # never reported (the request failed, or was evicted unseen)
    decision = board.choose(("a", "b"), request(5, 2))
    assert decision.reason == "room" and decision.chosen != here.worker


def test_two_replicas_place_an_unseen_prefix_alike() -> None:
    """Two ingress replicas, the same reports but for the last few changes: the margin (the
    request's own blocks) keeps them on the same worker."""
    rng = random.Random(3)
    a, b = Engine("a"), Engine("b")
    for session in range(4):
        a.store(session)
        b.store(10 + session)
    one, other = board_of(a, b), board_of(a, b)
    a.store(4)  # reaches one replica only: ~6 blocks, under a session's ~7
    report(one, a)
    ready = ("a", "b")
    for session in rng.sample(range(100, 200), 30):
        first = one.choose(ready, request(session, 0), record=False)
        assert first.reason == "room"
        assert first.chosen == other.choose(ready, request(session, 0), record=False).chosen


def test_room_placement_is_guarded_by_load_and_headroom() -> None:
    a, b = Engine("a"), Engine("b")
    for session in range(3):
        a.store(session)
    board = board_of(a, b)
    assert board.choose(("a", "b"), request(7, 0), record=False).chosen == "b"
    b.active = 6  # more than max_imbalance above a
    report(board, b)
    decision = board.choose(("a", "b"), request(7, 0), record=False)
    assert (decision.chosen, decision.reason) == ("a", "imbalance")
    b.active = 0
    report(board, b, free_blocks=2)  # b cannot admit it now
    decision = board.choose(("a", "b"), request(7, 0), record=False)
    assert (decision.chosen, decision.reason) == ("a", "headroom")


def test_placement_picks_two_workers_whatever_the_fleet_size() -> None:
    engines = [Engine(f"w{n:04d}") for n in range(1000)]
    board = board_of(*engines)
    ready = tuple(engine.worker for engine in engines)
    shuffled = tuple(random.Random(1).sample(ready, len(ready)))
    chosen = set()
    for session in range(50):
        decision = board.choose(ready, request(session, 0), record=False)
        assert decision.reason == "room"
        assert board.choose(shuffled, request(session, 0), record=False).chosen == decision.chosen
        chosen.add(decision.chosen)
    assert len(chosen) > 40  # spread, not one home for every prompt sharing a system prompt


def test_without_kv_events_an_unseen_prefix_goes_to_its_home_as_before() -> None:
    board = RoutingBoard(max_imbalance=4)
    for worker in ("a", "b", "c"):
        board.update(worker, 0, None)
    ready = ("a", "b", "c")
    decision = board.choose(ready, request(7, 0))
    keys = affinity_keys(request(7, 0))
    assert (decision.chosen, decision.reason) == (rendezvous_home(keys[0], ready), "home")
    # every session behind the same system prompt now follows where the first went
    assert board.choose(ready, request(8, 0)).chosen == decision.chosen


def test_an_explicit_cache_key_stays_on_its_worker_as_room_changes() -> None:
    """A caller's `prompt_cache_key` names its session: once placed, its next requests follow
    it (counted as sent there) though the other worker's cache has more room by then."""
    a, b = Engine("a"), Engine("b")
    board = board_of(a, b)
    keyed = GenerationRequest(
        "k0", MODEL, SamplingOptions(max_new_tokens=16), prompt="hi", prompt_cache_key="chat-42"
    )
    first = board.choose(("a", "b"), keyed).chosen
    other = b if first == "a" else a
    taken = a if first == "a" else b
    taken.total_blocks, other.total_blocks = 20, 200  # the other now has far more room
    report(board, a, b)
    assert board.choose(("a", "b"), keyed).chosen == first
