"""KV ledger accounting and admission: budgets, shared prefixes, the bounded queue, and that
every path gives its handle back."""

from __future__ import annotations

import asyncio
import random

import pytest

from app.errors import InputTooLong, QueueFull
from app.kv.admission import KVAdmission
from app.kv.ledger import KVLedger, prefix_block_keys
from app.protocol.sagellm import KVAllocateParams
from app.tenancy.fairshare import Flow

BLOCK = 4


def params(request_id: str, tokens: int = 8) -> KVAllocateParams:
    return KVAllocateParams(
        request_id=request_id, num_tokens=tokens, kv_dtype="fp16", layout="bshd", block_size=BLOCK
    )


def test_demand_counts_prompt_blocks_and_budget_per_candidate() -> None:
    ledger = KVLedger(100, BLOCK)
    demand = ledger.demand(list(range(10)), max_new_tokens=6, candidates=3)
    # 2 full prompt blocks (before the last token), computed once and cached as allocated;
    # tail 2 + 6 new = 2 blocks per candidate
    assert len(demand.prefix_keys) == 2 and demand.private_blocks == 6 and demand.blocks == 12
    assert ledger.new_blocks(demand) == 8


def test_the_block_holding_the_last_prompt_token_is_never_shared() -> None:
    """vLLM computes the last prompt token again even on a full cache hit."""
    ledger = KVLedger(100, BLOCK)
    assert len(ledger.demand(list(range(8)), 1).prefix_keys) == 1
    assert len(ledger.demand(list(range(9)), 1).prefix_keys) == 2


def test_prefix_keys_chain_the_whole_prefix_and_its_namespace() -> None:
    assert (
        prefix_block_keys([1, 2, 3, 4, 5, 6, 7, 8], BLOCK)[1]
        != prefix_block_keys([9, 9, 9, 9, 5, 6, 7, 8], BLOCK)[1]
    )
    assert prefix_block_keys([1, 2, 3], BLOCK) == []
    assert prefix_block_keys([1, 2, 3, 4], BLOCK, "lora-a") != prefix_block_keys(
        [1, 2, 3, 4], BLOCK
    )


def test_a_prefix_is_shared_at_once_and_released_with_the_last_holder() -> None:
    """vLLM caches a prompt's blocks as it allocates them: a later request reuses them."""
    ledger = KVLedger(100, BLOCK)
    prompt = list(range(9))  # 2 shareable blocks, tail 1 token
    first = ledger.allocate(params("a"), ledger.demand(prompt, 3))
    assert first is not None and ledger.used_blocks == 3
    second = ledger.allocate(params("b"), ledger.demand(prompt, 3))
    assert second is not None and ledger.used_blocks == 4  # + one private block only
    assert ledger.free(first) and ledger.used_blocks == 3  # b still holds a's cached copy
    assert not ledger.free(first)  # twice is harmless
    assert ledger.free(second) and ledger.used_blocks == 0 and ledger.open_handles == 0


def test_blocks_past_the_first_prefill_chunk_are_shared_only_once_computed() -> None:
    """With chunked prefill (here 1 block per step), a request arriving while the holder still
    computes its prompt computes, and holds, its own copy of the later blocks; so does each
    candidate."""
    ledger = KVLedger(100, BLOCK, chunk_tokens=BLOCK)
    prompt = list(range(9))
    first = ledger.allocate(params("a"), ledger.demand(prompt, 3))
    assert first is not None and ledger.used_blocks == 3
    racing = ledger.allocate(params("b"), ledger.demand(prompt, 3))
    assert racing is not None and ledger.used_blocks == 5  # its own 2nd block + private
    assert ledger.new_blocks(ledger.demand(prompt, 3, candidates=3)) == 3 + 3
    assert ledger.prefilled("a") and not ledger.prefilled("a")
    later = ledger.allocate(params("c"), ledger.demand(prompt, 3))
    assert later is not None and ledger.used_blocks == 6  # + one private block only
    assert ledger.free(first) and ledger.used_blocks == 5  # c holds a's cached copies
    assert ledger.free(racing) and ledger.used_blocks == 3
    assert ledger.free(later) and ledger.used_blocks == 0


def test_the_running_count_of_blocks_is_the_sum_over_all_blocks() -> None:
    """`used_blocks` is kept as requests come, prefill and go (so admission reads it in O(1)):
    after every step of a random mix of shared prefixes, candidates and chunked prefill, it is
    what counting every prefix block's physical copies gives."""
    rng = random.Random(7)
    ledger = KVLedger(10_000, BLOCK, chunk_tokens=2 * BLOCK)
    prefixes = [[rng.randrange(50) for _ in range(4 * BLOCK)] for _ in range(3)]
    held = []
    for step in range(400):
        action = rng.random()
        if action < 0.45 or not held:
            prompt = [*rng.choice(prefixes)[: rng.randrange(1, 4 * BLOCK)], step]
            demand = ledger.demand(prompt, rng.randrange(1, 9), rng.choice([1, 1, 3]))
            handle = ledger.allocate(params(f"r{step}"), demand)
            assert handle is not None
            held.append(handle)
        elif action < 0.7:
            ledger.prefilled(rng.choice(held).request_id)
        else:
            assert ledger.free(held.pop(rng.randrange(len(held))))
        keys = set(ledger._payers) | set(ledger._sharers)
        counted = sum(ledger._copies(key) for key in keys) + ledger._private_blocks
        assert ledger.used_blocks == counted
    for handle in held:
        ledger.free(handle)
    assert ledger.used_blocks == 0


def test_candidates_of_one_request_share_the_prompt_blocks() -> None:
    ledger = KVLedger(100, BLOCK)
    prompt = list(range(9))
    # n=3 of a new prompt: 2 prompt blocks once + 1 private per candidate
    assert ledger.new_blocks(ledger.demand(prompt, 3, candidates=3)) == 5
    held = ledger.allocate(params("a"), ledger.demand(prompt, 3))
    assert held is not None and ledger.used_blocks == 3
    assert ledger.new_blocks(ledger.demand(prompt, 3, candidates=3)) == 3  # cached: privates


def test_without_prefix_caching_nothing_is_shared() -> None:
    ledger = KVLedger(100, BLOCK, share_prefixes=False)
    prompt = list(range(9))
    assert ledger.allocate(params("a"), ledger.demand(prompt, 3)) is not None
    ledger.prefilled("a")
    assert ledger.allocate(params("b"), ledger.demand(prompt, 3)) is not None
    assert ledger.used_blocks == 6


def test_another_namespace_shares_nothing() -> None:
    ledger = KVLedger(100, BLOCK)
    prompt = list(range(9))
    assert ledger.allocate(params("a"), ledger.demand(prompt, 3)) is not None
    ledger.prefilled("a")
    assert ledger.new_blocks(ledger.demand(prompt, 3, namespace="lora-a")) == 3


def test_allocation_refuses_what_does_not_fit_now() -> None:
    ledger = KVLedger(4, BLOCK)
    assert ledger.allocate(params("a"), ledger.demand([1], 11)) is not None  # 3 blocks
    assert ledger.allocate(params("b"), ledger.demand([2], 7)) is None  # needs 2, 1 free
    assert not ledger.fits_ever(ledger.demand([3], 100))


async def test_admission_grants_at_once_and_frees_on_exit() -> None:
    admission = KVAdmission(KVLedger(10, BLOCK), max_waiting=2, max_wait_s=1)
    async with admission.reserve("a", [1, 2, 3], 5) as handle:
        assert handle.request_id == "a" and admission.ledger.used_blocks == 2
    assert admission.ledger.used_blocks == 0


async def test_admission_frees_when_the_body_raises_or_is_cancelled() -> None:
    admission = KVAdmission(KVLedger(10, BLOCK), max_waiting=2, max_wait_s=1)
    with pytest.raises(RuntimeError):
        async with admission.reserve("a", [1], 5):
            raise RuntimeError("engine failed")
    entered = asyncio.Event()

    async def hold() -> None:
        async with admission.reserve("b", [1], 5):
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(hold())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert admission.ledger.used_blocks == 0 and admission.ledger.open_handles == 0


async def test_waiters_are_served_in_order_when_space_frees() -> None:
    admission = KVAdmission(KVLedger(4, BLOCK), max_waiting=4, max_wait_s=5)
    order: list[str] = []
    release = asyncio.Event()

    async def request(name: str, hold: bool) -> None:
        async with admission.reserve(name, [1], 15):  # 4 blocks: the whole ledger
            order.append(name)
            if hold:
                await release.wait()

    first = asyncio.create_task(request("first", True))
    await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(request(name, False)) for name in ("second", "third")]
    await asyncio.sleep(0.01)
    assert admission.waiting == 2
    release.set()
    await asyncio.gather(first, *waiting)
    assert order == ["first", "second", "third"]
    assert admission.ledger.used_blocks == 0


async def test_queue_bound_and_wait_bound_give_queue_full_with_retry_after() -> None:
    admission = KVAdmission(KVLedger(4, BLOCK), max_waiting=1, max_wait_s=0.05)
    async with admission.reserve("holder", [1], 15):
        waiter = asyncio.create_task(_enter(admission, "waiter"))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as full:
            await _enter(admission, "rejected")
        assert full.value.retry_after_s is not None and full.value.status == 503
        with pytest.raises(QueueFull):
            await waiter  # timed out waiting
    assert admission.waiting == 0 and admission.ledger.used_blocks == 0


async def test_past_the_engines_batch_requests_wait_here_in_rank_order_within_the_bounds() -> None:
    """max_running (vLLM's max_num_seqs) counts sequences: a request's candidates each count;
    past it requests wait in this queue (priority first), time out as QUEUE_FULL, and every
    path gives its sequences back. One bigger than the batch runs alone."""
    admission = KVAdmission(KVLedger(100, BLOCK), max_waiting=4, max_wait_s=0.3, max_running=3)
    release = asyncio.Event()
    order: list[str] = []

    async def request(name: str, candidates: int = 1, priority: int = 0) -> None:
        flow = Flow(priority=priority)
        async with admission.reserve(name, [1], 3, candidates, flow=flow):
            order.append(name)
            await release.wait()

    pair = asyncio.create_task(request("pair", candidates=2))
    one = asyncio.create_task(request("one"))
    await asyncio.sleep(0.01)
    assert admission.running == 3 and admission.ledger.free_blocks > 90  # room, but no seat
    low = asyncio.create_task(request("low", priority=1))
    high = asyncio.create_task(request("high", priority=0))
    await asyncio.sleep(0.01)
    assert order == ["pair", "one"] and admission.waiting == 2
    release.set()
    await asyncio.gather(pair, one, low, high)
    assert order == ["pair", "one", "high", "low"]
    assert admission.running == 0 and admission.waiting == 0
    release.clear()
    wide = asyncio.create_task(request("wide", candidates=5))  # wider than the batch: alone
    await asyncio.sleep(0.01)
    assert order[-1] == "wide" and admission.running == 5
    with pytest.raises(QueueFull):
        await _enter(admission, "timed out")  # waited max_wait_s for a seat
    release.set()
    await wide
    assert admission.running == 0 and admission.waiting == 0 and admission.ledger.used_blocks == 0


async def test_a_request_that_can_never_fit_is_refused() -> None:
    admission = KVAdmission(KVLedger(4, BLOCK), max_waiting=1, max_wait_s=1)
    with pytest.raises(InputTooLong):
        await _enter(admission, "huge", max_new=100)


async def _enter(admission: KVAdmission, name: str, max_new: int = 15) -> None:
    async with admission.reserve(name, [1], max_new):
        pass
