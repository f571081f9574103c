"""KV ledger accounting and admission: budgets, shared prefixes, the bounded queue, and that
every path gives its handle back."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import InputTooLong, QueueFull
from app.kv.admission import KVAdmission
from app.kv.ledger import KVLedger, prefix_block_keys
from app.protocol.sagellm import KVAllocateParams

BLOCK = 4


def params(request_id: str, tokens: int = 8) -> KVAllocateParams:
    return KVAllocateParams(
        request_id=request_id, num_tokens=tokens, kv_dtype="fp16", layout="bshd", block_size=BLOCK
    )


def test_demand_counts_prompt_blocks_and_budget_per_candidate() -> None:
    ledger = KVLedger(100, BLOCK)
    demand = ledger.demand(list(range(10)), max_new_tokens=6, candidates=3)
    # 2 full prompt blocks shared; tail 2 + 6 new = 8 tokens = 2 blocks per candidate
    assert len(demand.prefix_keys) == 2 and demand.private_blocks == 6 and demand.blocks == 8


def test_prefix_keys_chain_the_whole_prefix() -> None:
    assert (
        prefix_block_keys([1, 2, 3, 4, 5, 6, 7, 8], BLOCK)[1]
        != prefix_block_keys([9, 9, 9, 9, 5, 6, 7, 8], BLOCK)[1]
    )
    assert prefix_block_keys([1, 2, 3], BLOCK) == []


def test_shared_prefix_blocks_are_counted_once_and_released_with_the_last_holder() -> None:
    ledger = KVLedger(100, BLOCK)
    prompt = list(range(8))
    first = ledger.allocate(params("a"), ledger.demand(prompt, 4))
    assert first is not None and ledger.used_blocks == 3
    second = ledger.allocate(params("b"), ledger.demand(prompt, 4))
    assert second is not None and ledger.used_blocks == 4  # + one private block only
    assert ledger.free(first) and ledger.used_blocks == 3
    assert not ledger.free(first)  # twice is harmless
    assert ledger.free(second) and ledger.used_blocks == 0 and ledger.open_handles == 0


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


async def test_a_request_that_can_never_fit_is_refused() -> None:
    admission = KVAdmission(KVLedger(4, BLOCK), max_waiting=1, max_wait_s=1)
    with pytest.raises(InputTooLong):
        await _enter(admission, "huge", max_new=100)


async def _enter(admission: KVAdmission, name: str, max_new: int = 15) -> None:
    async with admission.reserve(name, [1], max_new):
        pass
