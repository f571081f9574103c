"""The ingress's affinity keys (text-prefix hashes, `app.routing.affinity`) as the engines
hold them, from their KV-cache events. Pure.

The ingress does not tokenize; the worker does (to admit each request). So each worker maps
the affinity keys of every prompt it serves, whichever ingress replica sent it, to the vLLM
block that covers the same share of the prompt's tokens, and knows from its engine's events
which of those blocks are cached (`WorkerKeys`): a key is *held* while its block is. Changes
to the held set are numbered; the acknowledgement of every call carries the last ones
(`summary`), and each ingress replica applies what it has not seen (`ReportedKeys`); one that
missed some (a restart, a quiet spell) fetches the whole set once (`full`). One source of
truth, the engine's own record, for every ingress replica. Until a worker's events report a
prefix this replica just sent it, the replica counts it as held there for a few seconds
(`ReportedKeys.record`), so the next turns it routes in that gap follow the first.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from app.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from app.routing.affinity import BLOCK_CHARS
from app.routing.kv_index import KVBlockIndex

LOG_KEPT = 128  # changes carried on each acknowledgement (older ones: fetch the whole set)
SELF = ""  # the worker's own engine in its one-worker index
# A key this replica sent a worker counts as held there until its events report it, at most
# this long (the prompt's prefill, its BlockStored and the next acknowledgement; a request may
# wait for KV space first). Longer would send a prefix evicted meanwhile back to its evictor.
SENT_SECONDS = 10.0
SENT_KEPT = 65_536

Summary = list[Any]  # [epoch, seq, first_seq | None, changes [(key, held)] | held keys]


def key_block(position: int, text_chars: int, tokens: int, block_size: int, blocks: int) -> int:
    """The block covering as much of the prompt's tokens as the key at `position` covers of
    its text (the key of 256 characters x (position + 1)); -1: less than one block."""
    if text_chars <= 0 or blocks <= 0:
        return -1
    share = min(1.0, BLOCK_CHARS * (position + 1) / text_chars)
    return min(blocks - 1, int(share * tokens) // block_size - 1)


class WorkerKeys:
    """One worker's model: its engine's blocks (`index`, from the events) and which affinity
    keys they hold. Counts the prompts' blocks found cached on arrival (the routed requests'
    prefix-hit ratio)."""

    def __init__(self, epoch: str, capacity: int = 4096) -> None:
        self.epoch = epoch
        self.capacity = capacity
        self.index = KVBlockIndex()
        self.seq = 0
        self.prompt_blocks = 0
        self.matched_blocks = 0
        self._key_block: OrderedDict[str, int] = OrderedDict()
        self._block_keys: dict[int, set[str]] = {}
        self._held: set[str] = set()
        self._log: deque[tuple[str, bool]] = deque(maxlen=LOG_KEPT)

    @property
    def cached_blocks(self) -> int:
        return self.index.cached_blocks(SELF)

    def apply(self, event: KVEvent) -> None:
        self.index.apply(SELF, event)
        if isinstance(event, BlockStored):
            self._mark(event.keys, True)
        elif isinstance(event, BlockRemoved):
            self._mark(event.keys, False)
        elif isinstance(event, AllBlocksCleared):
            for key in list(self._held):
                self._set(key, False)

    def _mark(self, blocks: Iterable[int], held: bool) -> None:
        for block in blocks:
            for key in self._block_keys.get(block, ()):
                self._set(key, held)

    def prompt(
        self,
        keys: Sequence[str],
        text_chars: int,
        chain: Sequence[int],
        tokens: int,
        block_size: int,
    ) -> int:
        """A prompt arrived: its affinity keys, its text length, its block chain (`kv_hash`)
        and token count. Returns its leading blocks cached here now."""
        matched = self.index.longest_prefix(SELF, chain)
        self.prompt_blocks += len(chain)
        self.matched_blocks += matched
        for position, key in enumerate(keys):
            block = key_block(position, text_chars, tokens, block_size, len(chain))
            if block >= 0:
                self._map(key, chain[block])
        return matched

    def _map(self, key: str, block: int) -> None:
        old = self._key_block.get(key)
        if old is not None:
            self._key_block.move_to_end(key)
            if old == block:
                return
            self._unlink(key, old)
        self._key_block[key] = block
        self._block_keys.setdefault(block, set()).add(key)
        self._set(key, self.index.holds(SELF, block))
        while len(self._key_block) > self.capacity:
            dropped, dropped_block = self._key_block.popitem(last=False)
            self._unlink(dropped, dropped_block)
            self._set(dropped, False)

    def _unlink(self, key: str, block: int) -> None:
        keys = self._block_keys.get(block)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._block_keys[block]

    def _set(self, key: str, held: bool) -> None:
        if (key in self._held) == held:
            return
        if held:
            self._held.add(key)
        else:
            self._held.discard(key)
        self.seq += 1
        self._log.append((key, held))

    def summary(self) -> Summary:
        """The last changes, for the acknowledgement of a call (a few hundred bytes at most
        per change: 16-character keys)."""
        return [self.epoch, self.seq, self.seq - len(self._log), list(self._log)]

    def full(self) -> Summary:
        return [self.epoch, self.seq, None, sorted(self._held)]

    def held(self) -> set[str]:
        return set(self._held)


class ReportedKeys:
    """An ingress replica's view of every worker's held keys, from their summaries. Reads
    like `affinity.PrefixIndex` (`match`, `holders`), so `RoutingBoard` uses either; `record`
    counts a key as held where this replica sent it until the worker reports it (or
    `SENT_SECONDS` pass): the gap between a prompt's routing and its blocks' events."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[tuple[str, str], set[str]] = {}  # (worker, model) -> held keys
        self._holders: dict[str, str | set[str]] = {}  # key -> worker(s)
        self._cursor: dict[tuple[str, str], tuple[str, int]] = {}  # -> (epoch, seq)
        self._sent: dict[str, tuple[str, float]] = {}  # key -> (worker, until), oldest first

    def apply(self, worker: str, model: str, summary: Summary) -> bool:
        """Apply a summary; True when changes were missed (fetch `WorkerKeys.full`)."""
        epoch, seq, first, changes = summary
        slot = (worker, model)
        cursor = self._cursor.get(slot)
        if first == 0 and (cursor is None or cursor[0] != epoch):
            # every change since the worker (re)started is here: start from nothing
            self._drop(slot)
            cursor = (epoch, 0)
        if first is None:  # the whole set
            if cursor is not None and cursor[0] == epoch and cursor[1] >= seq:
                return False
            self._drop(slot)
            self._add(slot, changes)
            self._cursor[slot] = (epoch, seq)
            return False
        if cursor is not None and cursor[0] == epoch:
            if cursor[1] >= seq:
                return False
            if cursor[1] >= first:
                for key, held in changes[cursor[1] - first :]:
                    if held:
                        self._add(slot, (key,))
                    else:
                        self._remove(slot, key)
                self._cursor[slot] = (epoch, seq)
                return False
        return seq > 0 or cursor is not None  # a new epoch or a gap: fetch the whole set

    def _add(self, slot: tuple[str, str], keys: Iterable[str]) -> None:
        held = self._keys.setdefault(slot, set())
        holders, sent = self._holders, self._sent
        worker = slot[0]
        for key in keys:
            if key in held:
                continue
            held.add(key)
            if sent and (was := sent.get(key)) is not None and was[0] == worker:
                del sent[key]  # reported: the events speak for it from now on
            current = holders.get(key)
            if current is None:
                holders[key] = worker  # one holder: the id itself (no set per key)
            elif isinstance(current, str):
                if current != worker:
                    holders[key] = {current, worker}
            else:
                current.add(worker)

    def _remove(self, slot: tuple[str, str], key: str) -> None:
        held = self._keys.get(slot)
        if held is None or key not in held:
            return
        held.discard(key)
        current = self._holders.get(key)
        if isinstance(current, str):
            if current == slot[0]:
                del self._holders[key]
        elif current is not None:
            current.discard(slot[0])
            if len(current) == 1:
                self._holders[key] = next(iter(current))

    def _drop(self, slot: tuple[str, str]) -> None:
        for key in list(self._keys.get(slot, ())):
            self._remove(slot, key)
        self._keys.pop(slot, None)

    def match(self, worker_id: str, keys: Sequence[str]) -> int:
        """The keys up to the end of the first run `worker_id` holds: the leading keys shorter
        than a KV block are never held, so a run may start after them."""
        end = 0
        for position, key in enumerate(keys):
            if worker_id in self.holders(key):
                end = position + 1
            elif end:
                break
        return end

    def holders(self, key: str) -> set[str] | frozenset[str]:
        current = self._holders.get(key)
        sent = self._sent.get(key) if self._sent else None
        if sent is not None:
            if sent[1] <= self._clock():
                del self._sent[key]
            elif current is None:
                return frozenset((sent[0],))
            elif isinstance(current, str):
                return frozenset((current, sent[0]))
            else:
                return current | {sent[0]}
        if current is None:
            return _NOBODY
        return frozenset((current,)) if isinstance(current, str) else current

    def record(self, worker_id: str, keys: Sequence[str]) -> None:
        """This replica sent `keys` to `worker_id`: held there until its events report them,
        for `SENT_SECONDS` at most (the board records one key per request: the first that
        worker was not known to hold)."""
        sent = self._sent
        until = self._clock() + SENT_SECONDS
        for key in keys:
            sent.pop(key, None)  # to the end: the oldest entry goes first
            sent[key] = (worker_id, until)
        while len(sent) > SENT_KEPT:
            del sent[next(iter(sent))]

    def held_count(self, worker_id: str, model: str | None = None) -> int:
        """Keys the worker's engine holds (of one model, or of all)."""
        if model is not None:
            return len(self._keys.get((worker_id, model), ()))
        return sum(len(keys) for slot, keys in self._keys.items() if slot[0] == worker_id)

    def forget(self, worker_id: str) -> None:
        for slot in [slot for slot in self._keys if slot[0] == worker_id]:
            self._drop(slot)
        for slot in [slot for slot in self._cursor if slot[0] == worker_id]:
            del self._cursor[slot]
        for key in [key for key, (worker, _) in self._sent.items() if worker == worker_id]:
            del self._sent[key]


_NOBODY: frozenset[str] = frozenset()

__all__ = ["SENT_SECONDS", "ReportedKeys", "WorkerKeys", "key_block"]
