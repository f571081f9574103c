"""Which workers' engines hold which KV blocks, from their KV-cache events. Pure.

Blocks are keyed by the 64-bit form of vLLM's own block hash (`app.routing.kv_hash`), so a
prompt's chain of block keys, computed from its token ids, finds the workers whose prefix
cache holds its leading blocks. Each worker's events are applied in their order; a block held
by one worker costs one dict entry (its holder is the worker id itself, not a set).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from app.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

_NONE: frozenset[str] = frozenset()


class KVBlockIndex:
    def __init__(self) -> None:
        self._holders: dict[int, str | set[str]] = {}  # block key -> worker (or workers)
        self._blocks: dict[str, set[int]] = {}  # worker -> the block keys it holds

    def apply(self, worker: str, event: KVEvent) -> None:
        if isinstance(event, BlockStored):
            self.stored(worker, event.keys)
        elif isinstance(event, BlockRemoved):
            self.removed(worker, event.keys)
        elif isinstance(event, AllBlocksCleared):
            self.cleared(worker)

    def stored(self, worker: str, keys: Iterable[int]) -> None:
        held = self._blocks.get(worker)
        if held is None:
            held = self._blocks[worker] = set()
        holders = self._holders
        for key in keys:
            if key in held:
                continue
            held.add(key)
            current = holders.get(key)
            if current is None:
                holders[key] = worker
            elif isinstance(current, str):
                holders[key] = {current, worker}
            else:
                current.add(worker)

    def removed(self, worker: str, keys: Iterable[int]) -> None:
        held = self._blocks.get(worker)
        if not held:
            return
        for key in keys:
            if key in held:
                held.discard(key)
                self._unhold(key, worker)

    def cleared(self, worker: str) -> None:
        """AllBlocksCleared, or the worker left: nothing of it is held any more."""
        for key in self._blocks.pop(worker, ()):
            self._unhold(key, worker)

    forget = cleared

    def _unhold(self, key: int, worker: str) -> None:
        current = self._holders.get(key)
        if current is None:
            return
        if isinstance(current, str):
            if current == worker:
                del self._holders[key]
            return
        current.discard(worker)
        if len(current) == 1:
            self._holders[key] = next(iter(current))
        elif not current:
            del self._holders[key]

    def holders(self, key: int) -> frozenset[str] | set[str]:
        current = self._holders.get(key)
        if current is None:
            return _NONE
        return frozenset((current,)) if isinstance(current, str) else current

    def holds(self, worker: str, key: int) -> bool:
        return key in self._blocks.get(worker, ())

    def cached_blocks(self, worker: str) -> int:
        return len(self._blocks.get(worker, ()))

    def workers(self) -> list[str]:
        return list(self._blocks)

    def __len__(self) -> int:
        """Distinct blocks held by any worker."""
        return len(self._holders)

    def longest_prefix(self, worker: str, chain: Sequence[int]) -> int:
        """How many leading blocks of `chain` the worker holds."""
        held = self._blocks.get(worker)
        if not held:
            return 0
        count = 0
        for key in chain:
            if key not in held:
                break
            count += 1
        return count

    def matches(self, chain: Sequence[int]) -> dict[str, int]:
        """Every worker holding the chain's first block -> how many leading blocks it holds
        (workers holding none are left out): looks at the holders of the first block only."""
        if not chain:
            return {}
        return {worker: self.longest_prefix(worker, chain) for worker in self.holders(chain[0])}


__all__ = ["KVBlockIndex"]
