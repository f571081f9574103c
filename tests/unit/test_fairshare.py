"""Fair KV admission (app/tenancy/fairshare.py through app/kv/admission.py): priority first,
then each pool's share by weight, headroom kept for active light tenants and higher
priorities, and a full queue that refuses the heaviest tenant's newest waiter."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from app.errors import QueueFull
from app.kv.admission import KVAdmission
from app.kv.ledger import KVLedger
from app.tenancy.fairshare import FairShare, Flow, displaced, next_waiter

BLOCK = 16


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(blocks: int, max_waiting: int = 16, headroom: int = 2, batch: int = 0) -> KVAdmission:
    return KVAdmission(
        KVLedger(blocks, BLOCK),
        max_waiting=max_waiting,
        max_wait_s=5,
        fair=FairShare(headroom_requests=headroom, active_s=10, batch_requests=batch),
        clock=Clock(),
    )


class Holder:
    """Requests that hold their KV handle until released."""

    def __init__(self, kv: KVAdmission) -> None:
        self.kv = kv
        self.order: list[str] = []
        self.refused: list[str] = []
        self._release: dict[str, asyncio.Event] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, flow: Flow, blocks: int = 1) -> None:
        self._release[name] = asyncio.Event()
        self.tasks.append(asyncio.create_task(self._run(name, flow, blocks)))

    async def _run(self, name: str, flow: Flow, blocks: int) -> None:
        try:
            async with self.kv.reserve(name, [], blocks * BLOCK, flow=flow):
                self.order.append(name)
                await self._release[name].wait()
        except QueueFull:
            self.refused.append(name)

    def release(self, name: str) -> None:
        self._release[name].set()

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    async def finish(self) -> None:
        for event in self._release.values():
            event.set()
        await asyncio.gather(*self.tasks)


HEAVY = Flow("heavy", 0, 1.0)
LIGHT = Flow("light", 0, 1.0)


def test_priority_then_pool_share_order_the_queue() -> None:
    async def scenario() -> list[str]:
        holder = Holder(admission(4, headroom=0))
        for n in range(4):
            holder.start(f"h{n}", HEAVY)
        await holder.settle()
        holder.start("h-wait", HEAVY)
        holder.start("low", Flow("light", 5, 1.0))
        holder.start("l-wait", LIGHT)
        holder.start("urgent", Flow("heavy", -1, 1.0))
        await holder.settle()
        for name in ("h0", "h1", "h2"):
            holder.release(name)
            await holder.settle()
        order = holder.order[4:]
        await holder.finish()
        return order

    # urgent (priority -1) first; then light (it holds nothing, heavy holds 3); then heavy's
    # own waiter; the priority-5 request last
    assert asyncio.run(scenario()) == ["urgent", "l-wait", "h-wait"]


def test_headroom_keeps_a_light_tenant_from_waiting_behind_a_heavy_backlog() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        holder = Holder(admission(10, headroom=2))
        holder.start("l0", LIGHT)  # light is active
        await holder.settle()
        holder.release("l0")
        await holder.settle()
        for n in range(12):
            holder.start(f"h{n}", HEAVY)
        await holder.settle()
        heavy_admitted = list(holder.order[1:])
        holder.start("l1", LIGHT)
        await holder.settle()
        order = list(holder.order)
        await holder.finish()
        return heavy_admitted, order

    heavy, order = asyncio.run(scenario())
    assert len(heavy) == 8  # 10 blocks, 2 kept for the light tenant's next requests
    assert order[-1] == "l1"  # admitted at once, no heavy request ended


def test_an_idle_engine_admits_anything_that_fits() -> None:
    fair = FairShare(headroom_requests=5, active_s=10)
    fair.arrived(Flow("light", -1), 4, 0.0)
    assert fair.reserved_for_others(HEAVY, 10, 1.0) == 20
    assert fair.may_admit(HEAVY, 3, 10, 10, 1.0)  # the engine is empty
    assert not fair.may_admit(HEAVY, 3, 9, 10, 1.0)
    assert fair.reserved_for_others(HEAVY, 10, 20.0) == 0  # light went quiet
    assert fair.may_admit(HEAVY, 3, 9, 10, 20.0)


def test_same_priority_headroom_is_bounded_by_the_peers_share() -> None:
    fair = FairShare(headroom_requests=2, active_s=10)
    fair.arrived(LIGHT, 4, 0.0)
    fair.arrived(HEAVY, 4, 0.0)
    assert fair.reserved_for_others(HEAVY, 100, 1.0) == 8  # 2 requests of 4
    fair.admitted(LIGHT, 48)
    assert fair.reserved_for_others(HEAVY, 100, 1.0) == 2  # light's share is 50, it holds 48
    fair.admitted(LIGHT, 10)
    assert fair.reserved_for_others(HEAVY, 100, 1.0) == 0  # light is over its share
    # a lower priority keeps room for every active higher one, its own pool's too, uncapped
    assert fair.reserved_for_others(Flow("heavy", 1), 100, 1.0) == 16


def test_a_full_queue_refuses_the_heavy_tenant() -> None:
    async def scenario() -> Holder:
        holder = Holder(admission(2, max_waiting=3, headroom=0))
        holder.start("h0", HEAVY)
        holder.start("h1", HEAVY)
        await holder.settle()
        for n in range(2, 5):
            holder.start(f"h{n}", HEAVY)
        await holder.settle()
        holder.start("h5", HEAVY)  # the queue is full of heavy: the newcomer is refused
        await holder.settle()
        holder.start("l0", LIGHT)  # light displaces heavy's newest waiter
        await holder.settle()
        holder.release("h0")
        await holder.settle()
        await holder.finish()
        return holder

    holder = asyncio.run(scenario())
    assert holder.refused == ["h5", "h4"]
    assert holder.order[:3] == ["h0", "h1", "l0"]


def test_displacement_and_next_waiter_rules() -> None:
    waiting = [HEAVY, HEAVY, HEAVY, LIGHT]
    assert displaced(waiting, LIGHT) == 2  # heavy's newest
    assert displaced([HEAVY, HEAVY, LIGHT], LIGHT) is None  # it would be as loaded as heavy
    assert displaced(waiting, HEAVY) is None
    assert displaced([LIGHT], Flow("light", -1)) == 0  # a higher priority displaces
    assert displaced([Flow("x", -1)], LIGHT) is None
    assert displaced([Flow("big", 0, 4.0)] * 3, LIGHT) is None  # 3/4 per weight < 1
    fair = FairShare()
    fair.admitted(HEAVY, 4)
    assert next_waiter([HEAVY, LIGHT], fair) == 1
    assert next_waiter([], fair) is None


@pytest.mark.parametrize("max_waiting", [0, 1])
def test_no_queue_refuses_at_once(max_waiting: int) -> None:
    async def scenario() -> list[str]:
        holder = Holder(admission(1, max_waiting=max_waiting, headroom=0))
        holder.start("a", HEAVY)
        await holder.settle()
        holder.start("b", HEAVY)
        holder.start("c", HEAVY)
        await holder.settle()
        with contextlib.suppress(Exception):
            await holder.finish()
        return holder.refused

    refused = asyncio.run(scenario())
    assert refused == (["b", "c"] if max_waiting == 0 else ["c"])


def test_the_batch_is_shared_while_another_pool_is_active() -> None:
    """The KV cache has room for everything: the engine's batch is what pools share. Alone, a
    heavy pool runs all it sends; once a light pool is active, heavy's new requests wait while
    the batch keeps headroom for light, light's are admitted at once, and heavy comes back to
    what the batch leaves it as its requests end."""

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        holder = Holder(admission(1000, max_waiting=64, headroom=2, batch=8))
        for n in range(12):
            holder.start(f"h{n}", HEAVY)  # alone: all 12 run, over the batch of 8
        await holder.settle()
        alone = list(holder.order)
        holder.start("l0", LIGHT)  # under its share (4 of 8): at once, though the batch is over
        await holder.settle()
        for n in range(12, 16):
            holder.start(f"h{n}", HEAVY)
        await holder.settle()
        with_light = list(holder.order[len(alone) :])
        for n in range(8):  # 8 heavy requests end: 12 + 1 -> 5 running
            holder.release(f"h{n}")
            await holder.settle()
        # the batch of 8 less light's 1 running and 2 of headroom (its share is 4): heavy may
        # run 8 - 1 - 2 = 5 -> it is at 4, one more joins
        after = list(holder.order[len(alone) + len(with_light) :])
        await holder.finish()
        return alone, with_light, after

    alone, with_light, after = asyncio.run(scenario())
    assert len(alone) == 12
    assert with_light == ["l0"]
    assert after == ["h12"]


def test_batch_share_rules() -> None:
    fair = FairShare(headroom_requests=2, active_s=10, batch_requests=8)
    heavy, light, urgent = HEAVY, LIGHT, Flow("light", -1, 1.0)
    fair.arrived(heavy, 1, 0.0)
    for _ in range(10):
        fair.admitted(heavy, 1)
    assert fair.batch_allows(heavy, 1.0)  # alone
    fair.arrived(light, 1, 1.0)
    assert fair.batch_allows(light, 1.0)  # under its share: at once
    assert not fair.batch_allows(heavy, 1.0)  # over its share, the batch is over
    assert fair.batch_allows(heavy, 12.0)  # light went quiet: heavy is alone again
    # weights: a pool of weight 3 beside one of weight 1 has 6 of the 8
    big = Flow("big", 0, 3.0)
    fair2 = FairShare(headroom_requests=2, active_s=10, batch_requests=8)
    fair2.arrived(light, 1, 0.0)
    fair2.arrived(big, 1, 0.0)
    for _ in range(5):
        fair2.admitted(big, 1)
    assert fair2.batch_allows(big, 1.0)  # 5 < 6
    fair2.admitted(big, 1)
    assert not fair2.batch_allows(big, 1.0)  # 6 + 1 > 8 - 2 of light's headroom
    # a higher priority: always headroom for it, even for a flow under its share
    fair3 = FairShare(headroom_requests=2, active_s=10, batch_requests=8)
    fair3.arrived(urgent, 1, 0.0)
    fair3.arrived(heavy, 1, 0.0)
    for _ in range(5):
        fair3.admitted(heavy, 1)
    assert fair3.batch_allows(heavy, 1.0)  # 5 + 1 <= 8 - 2
    fair3.admitted(heavy, 1)
    assert not fair3.batch_allows(heavy, 1.0)
    assert fair3.batch_allows(urgent, 1.0)
    for _ in range(6):
        fair3.released(heavy, 1, 1.0)
    assert fair3.running == {}
    assert FairShare(batch_requests=0).batch_allows(heavy, 0.0)  # off


def test_a_pool_that_shares_by_key_splits_its_part_of_the_batch_among_its_keys() -> None:
    fair = FairShare(headroom_requests=0, active_s=10, batch_requests=12)
    k1, k2 = Flow("team", 0, 1.0, member="key-1"), Flow("team", 0, 1.0, member="key-2")
    other = Flow("other", 0, 1.0)
    for flow in (k1, k2, other):
        fair.arrived(flow, 1, 0.0)
    for _ in range(3):  # the team's half (6) split between its two active keys: 3 each
        assert fair.batch_allows(k1, 1.0)
        fair.admitted(k1, 1)
    for _ in range(6):
        fair.admitted(other, 1)
    # key-1 is at its share; the batch (12) has room for 3 more, none kept (headroom 0)
    assert fair.batch_allows(k1, 1.0)
    for _ in range(3):
        fair.admitted(k1, 1)
    assert not fair.batch_allows(k1, 1.0)  # 12 running: full
    assert fair.batch_allows(k2, 1.0)  # under its share (3): at once
    # key-2 goes quiet: key-1 has the team's whole half
    fair.arrived(k1, 1, 8.0)
    fair.arrived(other, 1, 8.0)
    assert fair.rank(k1) > fair.rank(k2)  # within the pool: fewer running first
    assert fair._batch_flows(12.0) == {(0, "team", "key-1"): 1.0, (0, "other", ""): 1.0}


def test_a_pool_with_requests_running_stays_active_without_sending() -> None:
    """A tenant whose requests all run (or wait) sends nothing meanwhile: it is still active,
    so a heavy pool alone beside it does not take the batch back when `active_s` passes."""
    fair = FairShare(headroom_requests=2, active_s=10, batch_requests=8)
    fair.arrived(HEAVY, 1, 0.0)
    fair.arrived(LIGHT, 1, 0.0)
    for _ in range(4):
        fair.admitted(LIGHT, 1)
    for _ in range(6):
        fair.admitted(HEAVY, 1)
    assert not fair.batch_allows(HEAVY, 30.0)  # light still runs its 4: 10 + 1 > 8
    for _ in range(4):
        fair.released(LIGHT, 1, 30.0)
    # light's requests ran 30 s, longer than active_s: its next one comes now, and the room
    # kept for it is still there (heavy 6 + 1 > 8 - 2)
    assert not fair.batch_allows(HEAVY, 35.0)
    assert fair.batch_allows(HEAVY, 40.1)  # light quiet for active_s: heavy is alone


@pytest.mark.parametrize("seed", range(20))
def test_the_early_refusal_refuses_only_what_reserve_refuses(seed: int) -> None:
    """`refusal_for(flow)` is asked before a request's prompt is rendered: whenever it refuses,
    `reserve` would have refused that same newcomer (not displaced a waiter, not admitted it),
    over random arrivals, releases, flows and priorities."""
    import random

    rng = random.Random(seed)
    flows = [HEAVY, LIGHT, Flow("heavy", 1, 1.0), Flow("other", 0, 2.0), Flow("light", -1, 1.0)]

    async def scenario() -> tuple[int, int]:
        kv = admission(rng.choice([2, 3, 4]), max_waiting=rng.choice([1, 2, 4]), batch=2)
        holder = Holder(kv)
        early = checked = 0
        for n in range(60):
            if rng.random() < 0.3 and holder.order:
                holder.release(rng.choice(holder.order))
                await holder.settle()
            flow = rng.choice(flows)
            refusal = kv.refusal_for(flow)
            holder.start(f"r{n}", flow)
            await holder.settle()
            if refusal is not None:
                early += 1
                assert f"r{n}" in holder.refused, (n, flow)
                assert refusal.code == "QUEUE_FULL" and refusal.retry_after_s
            checked += 1
        for task in holder.tasks:  # waiters the batch rule holds would wait out max_wait_s
            task.cancel()
        await asyncio.gather(*holder.tasks, return_exceptions=True)
        assert kv.waiting == 0 and kv.ledger.open_handles == 0
        return early, checked

    early, checked = asyncio.run(scenario())
    assert checked == 60 and early > 0
