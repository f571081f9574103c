"""The KV ledger of one engine: explicit block accounting with sageLLM `KVHandle`s.

Every admitted request holds a handle sized for its whole budget (prompt + max new tokens,
per candidate), so the engine can never be overcommitted. Full prompt blocks are keyed by a
chained hash of their tokens: blocks that another live handle already holds (a shared prefix,
which the engine's prefix cache reuses) are counted once. Pure Python, no clock, no Ray."""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from app.protocol.sagellm import KVAllocateParams, KVHandle


def prefix_block_keys(token_ids: Sequence[int], block_size: int) -> list[str]:
    """One key per *full* block of the prompt, each hashing the whole prefix up to its end."""
    keys = []
    digest = hashlib.blake2b(digest_size=16)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        digest.update(",".join(map(str, token_ids[start : start + block_size])).encode())
        keys.append(digest.copy().hexdigest())
    return keys


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one handle holds: shared prefix block keys plus private blocks."""

    handle: KVHandle
    prefix_keys: tuple[str, ...]
    private_blocks: int


@dataclass(frozen=True, slots=True)
class KVDemand:
    """The blocks a request needs: its full prompt blocks (shareable) and the rest."""

    prefix_keys: tuple[str, ...]
    private_blocks: int

    @property
    def blocks(self) -> int:
        return len(self.prefix_keys) + self.private_blocks


class KVLedger:
    def __init__(self, total_blocks: int, block_size: int, device: str = "cpu") -> None:
        if total_blocks <= 0 or block_size <= 0:
            raise ValueError("a KV ledger needs positive total_blocks and block_size")
        self.total_blocks = total_blocks
        self.block_size = block_size
        self.device = device
        self._prefix_refs: Counter[str] = Counter()
        self._private_blocks = 0
        self._reservations: dict[str, Reservation] = {}

    @property
    def used_blocks(self) -> int:
        return len(self._prefix_refs) + self._private_blocks

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    @property
    def open_handles(self) -> int:
        return len(self._reservations)

    def demand(
        self, prompt_token_ids: Sequence[int], max_new_tokens: int, candidates: int = 1
    ) -> KVDemand:
        """Blocks for the prompt (full blocks shareable) plus `candidates` x the generation
        budget; the prompt's partial last block is private to each candidate."""
        keys = tuple(prefix_block_keys(prompt_token_ids, self.block_size))
        tail_tokens = len(prompt_token_ids) - len(keys) * self.block_size
        per_candidate = math.ceil((tail_tokens + max_new_tokens) / self.block_size)
        return KVDemand(keys, per_candidate * candidates)

    def new_blocks(self, demand: KVDemand) -> int:
        """Blocks admitting `demand` would add now (shared prefix blocks already held are free)."""
        shared = sum(1 for key in set(demand.prefix_keys) if self._prefix_refs[key] > 0)
        return len(set(demand.prefix_keys)) - shared + demand.private_blocks

    def fits_now(self, demand: KVDemand) -> bool:
        return self.new_blocks(demand) <= self.free_blocks

    def fits_ever(self, demand: KVDemand) -> bool:
        return len(set(demand.prefix_keys)) + demand.private_blocks <= self.total_blocks

    def allocate(self, params: KVAllocateParams, demand: KVDemand) -> KVHandle | None:
        """A handle if `demand` fits now, else None (the caller queues or refuses)."""
        if params.request_id in self._reservations:
            raise ValueError(f"request {params.request_id} already holds a KV handle")
        if not self.fits_now(demand):
            return None
        handle = KVHandle(
            handle_id=uuid.uuid4().hex,
            request_id=params.request_id,
            num_tokens=params.num_tokens,
            device=self.device,
        )
        keys = tuple(dict.fromkeys(demand.prefix_keys))
        self._prefix_refs.update(keys)
        self._private_blocks += demand.private_blocks
        self._reservations[params.request_id] = Reservation(handle, keys, demand.private_blocks)
        return handle

    def free(self, handle: KVHandle) -> bool:
        """Release a handle; freeing twice is harmless (returns False)."""
        reservation = self._reservations.pop(handle.request_id, None)
        if reservation is None or reservation.handle.handle_id != handle.handle_id:
            if reservation is not None:
                self._reservations[handle.request_id] = reservation
            return False
        self._prefix_refs.subtract(reservation.prefix_keys)
        for key in reservation.prefix_keys:
            if self._prefix_refs[key] <= 0:
                del self._prefix_refs[key]
        self._private_blocks -= reservation.private_blocks
        return True
