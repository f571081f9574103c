"""The KV ledger of one engine: explicit block accounting with sageLLM `KVHandle`s.

Every admitted request holds a handle sized for its whole budget (prompt + max new tokens,
per candidate), so the engine can never be overcommitted. Full prompt blocks are keyed by a
chained hash of their tokens: a block that the engine's prefix cache will really reuse (some
live request has computed it) is counted once. Pure Python, no clock, no Ray."""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from app.protocol.sagellm import KVAllocateParams, KVHandle


def prefix_block_keys(token_ids: Sequence[int], block_size: int, namespace: str = "") -> list[str]:
    """One key per *full* block of the prompt, each hashing the whole prefix up to its end
    (and the `namespace`: the engine's cache keeps prefixes of different LoRA adapters or cache
    salts apart, so must we)."""
    keys = []
    digest = hashlib.blake2b(namespace.encode(), digest_size=16)
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        digest.update(",".join(map(str, token_ids[start : start + block_size])).encode())
        keys.append(digest.copy().hexdigest())
    return keys


@dataclass(slots=True)
class Reservation:
    """What one handle holds: its own copies of prefix blocks (`paid`, one per candidate),
    prefix blocks it reuses from the engine's cache (`shared`), and private blocks."""

    handle: KVHandle
    paid: tuple[str, ...]
    shared: tuple[str, ...]
    private_blocks: int
    prefilled: bool = False


@dataclass(frozen=True, slots=True)
class KVDemand:
    """The blocks a request needs: its full prompt blocks (shareable through the engine's
    prefix cache, but computed once per candidate unless already cached) and the rest."""

    prefix_keys: tuple[str, ...]
    private_blocks: int
    candidates: int = 1

    @property
    def blocks(self) -> int:
        """The most it can need: nothing cached."""
        return len(set(self.prefix_keys)) * self.candidates + self.private_blocks


class KVLedger:
    """Blocks as the engine (vLLM's v1 block pool) spends them. vLLM enters a prompt's full
    blocks in its prefix cache when it allocates them, i.e. with the chunk of the prompt it
    schedules first (`chunk_tokens`, its max_num_batched_tokens): a later request, or another
    of the `n` candidates, reuses those at once. Blocks beyond the first chunk are reused only
    once the holder has computed its prompt (`prefilled`, its first token); until then, each
    request and each candidate holds its own copy. The last prompt token is always computed
    again, so the block that holds it is never a cache hit. Without prefix caching
    (`share_prefixes=False`) nothing is shared. `total_blocks` must be what the engine can
    hand out (vLLM keeps one null block back)."""

    def __init__(
        self,
        total_blocks: int,
        block_size: int,
        device: str = "cpu",
        *,
        share_prefixes: bool = True,
        chunk_tokens: int | None = None,
    ) -> None:
        if total_blocks <= 0 or block_size <= 0:
            raise ValueError("a KV ledger needs positive total_blocks and block_size")
        self.total_blocks = total_blocks
        self.block_size = block_size
        self.device = device
        self.share_prefixes = share_prefixes
        self.chunk_blocks = None if chunk_tokens is None else chunk_tokens // block_size
        self._payers: Counter[str] = Counter()  # live own copies of a prefix block
        self._sharers: Counter[str] = Counter()  # live reusers of the cached copy
        self._owner: dict[str, str] = {}  # key -> live request whose copy is the cached one
        self._private_blocks = 0
        self._prefix_blocks = 0  # physical copies of prefix blocks: `_copies` summed over all
        self._reservations: dict[str, Reservation] = {}

    def _copies(self, key: str) -> int:
        """Physical copies: every payer's own, plus the cached one while only reusers hold
        it (its owner gone)."""
        orphaned = self._sharers[key] > 0 and key not in self._owner
        return self._payers[key] + (1 if orphaned else 0)

    def _cached(self, key: str) -> bool:
        return key in self._owner or self._sharers[key] > 0

    def _copies_of(self, keys: set[str]) -> int:
        """Physical copies of `keys`: taking or freeing a handle changes only its own keys'
        copies, so `_prefix_blocks` moves by their difference and each admission decision
        reads `used_blocks` in O(1), not O(blocks)."""
        return sum(self._copies(key) for key in keys)

    @property
    def used_blocks(self) -> int:
        return self._prefix_blocks + self._private_blocks

    @property
    def free_blocks(self) -> int:
        return self.total_blocks - self.used_blocks

    @property
    def open_handles(self) -> int:
        return len(self._reservations)

    def demand(
        self,
        prompt_token_ids: Sequence[int],
        max_new_tokens: int,
        candidates: int = 1,
        namespace: str = "",
    ) -> KVDemand:
        """Full prompt blocks before the last prompt token (shareable), plus per candidate the
        rest of the prompt and the generation budget."""
        tokens = len(prompt_token_ids)
        keys: tuple[str, ...] = ()
        if self.share_prefixes and tokens > 1:
            keys = tuple(prefix_block_keys(prompt_token_ids[:-1], self.block_size, namespace))
        tail_tokens = tokens - len(keys) * self.block_size
        per_candidate = math.ceil((tail_tokens + max_new_tokens) / self.block_size)
        return KVDemand(keys, per_candidate * candidates, candidates)

    def _early(self, index: int) -> bool:
        """Is the prompt's `index`-th block in the chunk vLLM allocates (and caches) first?"""
        return self.chunk_blocks is None or index < self.chunk_blocks

    def _split(self, demand: KVDemand) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(own copies to pay for: a first-chunk block once, a later one per candidate; keys
        reused from the cache)."""
        paid: list[str] = []
        shared: list[str] = []
        for index, key in enumerate(demand.prefix_keys):
            if self._cached(key):
                shared.append(key)
            else:
                paid.extend([key] * (1 if self._early(index) else demand.candidates))
        return tuple(paid), tuple(shared)

    def new_blocks(self, demand: KVDemand) -> int:
        """Blocks admitting `demand` would add now."""
        paid, _ = self._split(demand)  # reusing the cached copy adds nothing
        return len(paid) + demand.private_blocks

    def fits_now(self, demand: KVDemand) -> bool:
        return self.new_blocks(demand) <= self.free_blocks

    def fits_ever(self, demand: KVDemand) -> bool:
        return demand.blocks <= self.total_blocks

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
        paid, shared = self._split(demand)
        keys = {*paid, *shared}
        before = self._copies_of(keys)
        self._payers.update(paid)
        self._sharers.update(shared)
        for index, key in enumerate(demand.prefix_keys):
            if self._early(index) and key not in self._owner and key in paid:
                self._owner[key] = params.request_id  # cached as it is allocated
        self._prefix_blocks += self._copies_of(keys) - before
        self._private_blocks += demand.private_blocks
        self._reservations[params.request_id] = Reservation(
            handle, paid, shared, demand.private_blocks
        )
        return handle

    def prefilled(self, request_id: str) -> bool:
        """The request's prompt is computed (its first token came): the engine's cache now
        holds all its prompt blocks for others to reuse. True the first time."""
        reservation = self._reservations.get(request_id)
        if reservation is None or reservation.prefilled:
            return False
        reservation.prefilled = True
        # an uncached key has no reusers, so giving it an owner changes no copy count
        for key in set(reservation.paid):
            if not self._cached(key):  # the first computed copy is the one the cache keeps
                self._owner[key] = request_id
        return True

    def free(self, handle: KVHandle) -> bool:
        """Release a handle; freeing twice is harmless (returns False)."""
        reservation = self._reservations.get(handle.request_id)
        if reservation is None or reservation.handle.handle_id != handle.handle_id:
            return False
        del self._reservations[handle.request_id]
        keys = {*reservation.paid, *reservation.shared}
        before = self._copies_of(keys)
        _subtract(self._payers, reservation.paid)
        _subtract(self._sharers, reservation.shared)
        for key in set(reservation.paid):
            if self._owner.get(key) == handle.request_id:
                del self._owner[key]
        self._prefix_blocks += self._copies_of(keys) - before
        self._private_blocks -= reservation.private_blocks
        return True


def _subtract(counter: Counter[str], keys: Sequence[str]) -> None:
    counter.subtract(keys)
    for key in set(keys):
        if counter[key] <= 0:
            del counter[key]
