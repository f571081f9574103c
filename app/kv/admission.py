"""Admission against the KV ledger and the engine's batch: a request that fits now (and leaves the
room fair share keeps for others: `app.tenancy.fairshare`) gets its handle at once; one that
does not waits in a bounded queue served by priority, then by each pool's share; past the bound
-> 503 QUEUE_FULL with Retry-After for the lowest-ranked waiter (the newcomer or a waiter it
displaces); one that could never fit -> 400 INPUT_TOO_LONG. The handle is freed on every path
(completion, error, cancellation), and freeing wakes the queue.

The engine runs at most `max_running` sequences (vLLM's `max_num_seqs`); requests past that wait
here, not in the engine's own queue, which has no bound on time and no notion of shares: so
this queue is the only one in front of the engine, and its bounds and order are the service's."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from app.errors import InputTooLong, QueueFull
from app.kv.ledger import KVDemand, KVLedger
from app.protocol.sagellm import KVAllocateParams, KVDType, KVHandle, KVLayout
from app.tenancy.fairshare import FairShare, Flow, displaced, next_waiter


@dataclass(slots=True)
class _Waiter:
    params: KVAllocateParams
    demand: KVDemand
    granted: asyncio.Future[KVHandle]
    flow: Flow = field(default_factory=Flow)
    sequences: int = 1


class KVAdmission:
    def __init__(
        self,
        ledger: KVLedger,
        *,
        max_waiting: int,
        max_wait_s: float,
        kv_dtype: str = "float32",
        fair: FairShare | None = None,
        max_running: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ledger = ledger
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self.max_running = max_running
        """Engine sequences admitted at once (None: as many as the KV cache takes)."""
        self.running = 0
        """Engine sequences admitted and not yet ended (a request's candidates each count)."""
        self._kv_dtype = kv_dtype
        self.fair = fair or FairShare()
        self._clock = clock
        self._waiters: list[_Waiter] = []

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _params(self, request_id: str, tokens: int) -> KVAllocateParams:
        # sageLLM v0.1's KVDType has no fp32; the engine's real dtype rides in metadata.
        dtype = {"bfloat16": KVDType.BF16, "int8": KVDType.INT8}.get(self._kv_dtype, KVDType.FP16)
        return KVAllocateParams(
            request_id=request_id,
            num_tokens=max(1, tokens),
            kv_dtype=dtype,
            layout=KVLayout.BSHD,
            block_size=self.ledger.block_size,
            metadata={"kv_dtype": self._kv_dtype},
        )

    def retry_after_s(self) -> float:
        return float(1 + len(self._waiters) // 8)

    @contextlib.asynccontextmanager
    async def reserve(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_new_tokens: int,
        candidates: int = 1,
        namespace: str = "",
        *,
        flow: Flow | None = None,
    ) -> AsyncIterator[KVHandle]:
        ledger = self.ledger
        flow = flow or Flow()
        demand = ledger.demand(prompt_token_ids, max_new_tokens, candidates, namespace)
        if not ledger.fits_ever(demand):
            raise InputTooLong(
                f"this request needs {demand.blocks} KV blocks of {ledger.block_size} tokens; "
                f"the worker has {ledger.total_blocks} in all",
                param="max_tokens",
            )
        params = self._params(request_id, len(prompt_token_ids) + candidates * max_new_tokens)
        self.fair.arrived(flow, demand.blocks, self._clock())
        handle = await self._wait(_Waiter(params, demand, _future(), flow, candidates))
        try:
            yield handle
        finally:
            self.running -= candidates
            if ledger.free(handle):
                self.fair.released(flow, demand.blocks, self._clock())
            self._grant_waiters()

    def prefilled(self, request_id: str) -> None:
        """The request's prompt blocks are in the engine's cache now: waiters sharing that
        prefix may fit."""
        if self.ledger.prefilled(request_id):
            self._grant_waiters()

    def for_flow(
        self, flow: Flow, observe: Callable[[Sequence[int], str], None] | None = None
    ) -> FlowAdmission:
        """This admission as one request's engine calls see it: in its tenant's flow
        (`observe` sees each engine request's prompt tokens)."""
        return FlowAdmission(self, flow, observe)

    def refusal_for(self, flow: Flow) -> QueueFull | None:
        """The refusal a request of `flow` arriving now gets whatever its size: the queue is
        full and it outranks no waiter. Asked before its prompt is rendered and tokenized, so
        a flood's refusals cost no more than the check (`reserve` decides again)."""
        waiters = self._waiters
        if not waiters or len(waiters) < self.max_waiting:
            return None
        if displaced([w.flow for w in waiters], flow) is not None:
            return None
        return self._queue_full()

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"{len(self._waiters)} requests are already waiting for KV space",
            retry_after_s=self.retry_after_s(),
        )

    def _refuse_one(self, newcomer: _Waiter) -> None:
        """The queue is full: refuse the newcomer, or the waiter it outranks."""
        index = displaced([w.flow for w in self._waiters], newcomer.flow)
        refusal = self._queue_full()
        if index is None:
            raise refusal
        victim = self._waiters.pop(index)
        victim.granted.set_exception(refusal)

    async def _wait(self, waiter: _Waiter) -> KVHandle:
        """Join the queue and let the policy hand out handles: this request's may come at once."""
        if self._waiters and len(self._waiters) >= self.max_waiting:
            self._refuse_one(waiter)
        self._waiters.append(waiter)
        self._grant_waiters()
        if waiter.granted.done() and not waiter.granted.cancelled():
            return waiter.granted.result()
        if len(self._waiters) > self.max_waiting:
            self._waiters.remove(waiter)
            raise self._queue_full()
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.granted), self.max_wait_s)
        except BaseException as error:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            granted = waiter.granted
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                # granted just as we gave up: give it back
                self.running -= waiter.sequences
                if self.ledger.free(waiter.granted.result()):
                    self.fair.released(waiter.flow, waiter.demand.blocks, self._clock())
                self._grant_waiters()
            else:
                waiter.granted.cancel()
            if isinstance(error, TimeoutError):
                raise QueueFull(
                    f"no KV space within {self.max_wait_s:g} s",
                    retry_after_s=self.retry_after_s(),
                ) from None
            raise

    def _grant_waiters(self) -> None:
        """Hand out handles in the fair-share order while the next waiter may be admitted (a
        flow whose share of the batch is full is passed over, not waited behind; a full engine
        stops all)."""
        ledger = self.ledger
        now = self._clock()
        full: set[Flow] = set()  # flows with no room in the batch now
        while True:
            index = next_waiter([w.flow for w in self._waiters], self.fair, skip=full)
            if index is None:
                return
            head = self._waiters[index]
            cap = self.max_running
            if cap is not None and self.running and self.running + head.sequences > cap:
                return
            if not self.fair.batch_allows(head.flow, now):
                full.add(head.flow)
                continue
            new_blocks = ledger.new_blocks(head.demand)
            if not self.fair.may_admit(
                head.flow, new_blocks, ledger.free_blocks, ledger.total_blocks, now
            ):
                return
            handle = ledger.allocate(head.params, head.demand)
            if handle is None:
                return
            del self._waiters[index]
            self.running += head.sequences
            self.fair.admitted(head.flow, head.demand.blocks)
            head.granted.set_result(handle)


def _future() -> asyncio.Future[KVHandle]:
    return asyncio.get_running_loop().create_future()


@dataclass(frozen=True, slots=True)
class FlowAdmission:
    """A KVAdmission with the flow (pool, priority) of one request's engine calls bound."""

    admission: KVAdmission
    flow: Flow
    observe: Callable[[Sequence[int], str], None] | None = None  # (prompt token ids, namespace)

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        max_new_tokens: int,
        candidates: int = 1,
        namespace: str = "",
    ) -> contextlib.AbstractAsyncContextManager[KVHandle]:
        if self.observe is not None:
            self.observe(prompt_token_ids, namespace)
        return self.admission.reserve(
            request_id, prompt_token_ids, max_new_tokens, candidates, namespace, flow=self.flow
        )

    def prefilled(self, request_id: str) -> None:
        self.admission.prefilled(request_id)

    def refusal_now(self) -> QueueFull | None:
        return self.admission.refusal_for(self.flow)
