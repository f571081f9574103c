"""GroupCall: what arrives while a call is in flight goes in the next call, and every item
waits for (and fails with) the call that carried it."""

from __future__ import annotations

import asyncio

import pytest

from app.tenancy.batching import GroupCall


class Remote:
    """A stand-in for a ledger method: records each call's items; a call returns (or fails)
    when the test releases it."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.release: list[asyncio.Future[None]] = []

    async def send(self, items: list[str]) -> None:
        self.calls.append(items)
        gate = asyncio.get_running_loop().create_future()
        self.release.append(gate)
        await gate


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def in_flight_and_queued(
    remote: Remote,
) -> tuple[GroupCall[str], asyncio.Task[None], asyncio.Task[None]]:
    """A group whose first call (carrying "a") is out, with "b" waiting for the next."""
    group = GroupCall(remote.send)
    first = asyncio.create_task(group.submit("a"))
    await settle()
    second = asyncio.create_task(group.submit("b"))
    await settle()
    return group, first, second


async def test_items_that_arrive_during_a_call_travel_together_in_the_next() -> None:
    remote = Remote()
    group = GroupCall(remote.send)
    first = asyncio.create_task(group.submit("a"))
    await settle()
    later = [asyncio.create_task(group.submit(name)) for name in ("b", "c", "d")]
    await settle()
    assert remote.calls == [["a"]]  # one call in flight at a time
    assert not any(task.done() for task in [first, *later])

    remote.release[0].set_result(None)
    await settle()
    assert first.done() and not any(task.done() for task in later)  # each waits for its call
    assert remote.calls == [["a"], ["b", "c", "d"]]

    remote.release[1].set_result(None)
    await asyncio.gather(*later)
    assert len(remote.calls) == 2


async def test_a_failed_call_fails_its_own_items_only() -> None:
    remote = Remote()
    _, first, second = await in_flight_and_queued(remote)
    remote.release[0].set_exception(ConnectionError("ledger restarting"))
    with pytest.raises(ConnectionError):
        await first
    await settle()
    assert remote.calls == [["a"], ["b"]]  # the next group still goes
    remote.release[1].set_result(None)
    await second


async def test_groups_are_capped() -> None:
    calls: list[list[int]] = []

    async def send(items: list[int]) -> None:
        calls.append(items)
        await asyncio.sleep(0)

    group = GroupCall(send, max_group=3)
    first = asyncio.create_task(group.submit(0))
    await asyncio.sleep(0)
    await asyncio.gather(first, *(group.submit(n) for n in range(1, 8)))
    assert calls == [[0], [1, 2, 3], [4, 5, 6], [7]]


async def test_a_waiter_that_gives_up_leaves_the_others_their_answer() -> None:
    remote = Remote()
    group = GroupCall(remote.send)
    impatient = asyncio.create_task(group.submit("a"))
    patient = asyncio.create_task(group.submit("b"))
    await settle()
    impatient.cancel()
    await settle()
    remote.release[0].set_result(None)
    await patient
    assert impatient.cancelled()
    assert remote.calls == [["a", "b"]]  # the item was already on its way


async def test_a_cancelled_sender_cancels_every_wait_and_starts_afresh() -> None:
    remote = Remote()
    group, sent, queued = await in_flight_and_queued(remote)
    assert group._sending is not None
    group._sending.cancel()  # as when the replica's loop shuts down
    await settle()
    assert sent.cancelled() and queued.cancelled()
    fresh = asyncio.create_task(group.submit("c"))
    await settle()
    assert remote.calls[-1] == ["c"]  # nothing stale rides along
    remote.release[-1].set_result(None)
    await fresh
