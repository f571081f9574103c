"""Admission against the KV ledger: a request that fits now gets its handle at once; one that
does not waits in a bounded FIFO queue; past the bound -> 503 QUEUE_FULL with Retry-After; one
that could never fit -> 400 INPUT_TOO_LONG. The handle is freed on every path (completion,
error, cancellation), and freeing wakes the queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from app.errors import InputTooLong, QueueFull
from app.kv.ledger import KVDemand, KVLedger
from app.protocol.sagellm import KVAllocateParams, KVDType, KVHandle, KVLayout


@dataclass(slots=True)
class _Waiter:
    params: KVAllocateParams
    demand: KVDemand
    granted: asyncio.Future[KVHandle]


class KVAdmission:
    def __init__(
        self, ledger: KVLedger, *, max_waiting: int, max_wait_s: float, kv_dtype: str = "float32"
    ) -> None:
        self.ledger = ledger
        self.max_waiting = max_waiting
        self.max_wait_s = max_wait_s
        self._kv_dtype = kv_dtype
        self._waiters: deque[_Waiter] = deque()

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
    ) -> AsyncIterator[KVHandle]:
        ledger = self.ledger
        demand = ledger.demand(prompt_token_ids, max_new_tokens, candidates, namespace)
        if not ledger.fits_ever(demand):
            raise InputTooLong(
                f"this request needs {demand.blocks} KV blocks of {ledger.block_size} tokens; "
                f"the worker has {ledger.total_blocks} in all",
                param="max_tokens",
            )
        params = self._params(request_id, len(prompt_token_ids) + candidates * max_new_tokens)
        handle = ledger.allocate(params, demand) if not self._waiters else None
        if handle is None:
            handle = await self._wait(params, demand)
        try:
            yield handle
        finally:
            ledger.free(handle)
            self._grant_waiters()

    def prefilled(self, request_id: str) -> None:
        """The request's prompt blocks are in the engine's cache now: waiters sharing that
        prefix may fit."""
        if self.ledger.prefilled(request_id):
            self._grant_waiters()

    async def _wait(self, params: KVAllocateParams, demand: KVDemand) -> KVHandle:
        if len(self._waiters) >= self.max_waiting:
            raise QueueFull(
                f"{len(self._waiters)} requests are already waiting for KV space",
                retry_after_s=self.retry_after_s(),
            )
        waiter = _Waiter(params, demand, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter.granted), self.max_wait_s)
        except BaseException as error:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if waiter.granted.done():  # granted just as we gave up: give it back
                self.ledger.free(waiter.granted.result())
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
        """Hand out handles in FIFO order while the head of the queue fits."""
        while self._waiters:
            head = self._waiters[0]
            handle = self.ledger.allocate(head.params, head.demand)
            if handle is None:
                return
            self._waiters.popleft()
            head.granted.set_result(handle)
