"""The routing decision at scale: the same decisions as `targets.choose_target` and
`affinity.rank`, at a cost that does not grow with the workers of the target group while their
loads do not change. Pure.

- `TargetIndex`: one per registry snapshot; `choose(request, now)` answers what
  `choose_target(config, workers, request, now, pools)` answers, computed once per (pool,
  profile header, model) and reused while no worker of the snapshot turns stale (only the
  prompt-size check runs per request).
- `RoutingBoard`: the replica's loads kept per target group in a heap, updated when a worker's
  requests in flight or its stats change (`update`), and `PrefixIndex`'s holders of each key:
  `choose` looks at the least loaded workers until one fits, the workers holding the request's
  first key, and the rendezvous home of an unseen prefix (remembered per first key while the
  group is the same), instead of every worker.

With the engines' KV events (`kv_events`) the holders are what the engines report, and a
prefix no engine holds is placed by cache room instead of at its home: of two workers its
hash picks (the same two on every replica), the one whose cache holds fewer blocks, unless
that gains less than the request's own size (`_placed`). A home would send a prefix its
worker evicted straight back there; room sends it where it can stay. The replica counts it
as held where it sent it until that worker's events report it (`ReportedKeys.record`), so
the session's next turns follow it in that gap.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from app.config import AppConfig
from app.pools.model import PoolRecord
from app.protocol.generation import GenerationRequest
from app.protocol.workers import EngineStats, WorkerStatus
from app.routing.affinity import (
    BLOCK_CHARS,
    CHARS_PER_TOKEN_ESTIMATE,
    PrefixIndex,
    RouteDecision,
    WorkerLoad,
    affinity_keys,
    digest,
    estimated_blocks,
    followed,
    rendezvous_home,
    worker_load,
)
from app.routing.kv_keys import ReportedKeys
from app.routing.targets import Target, check_prompt_fits, choose_target, request_pool

GROUPS_KEPT = 256
HOMES_KEPT = 65_536
HEAP_SLACK = 4  # rebuild a group's heap past this many entries per worker
KEY_TOKENS = BLOCK_CHARS / CHARS_PER_TOKEN_ESTIMATE  # the prompt an affinity key stands for
# a key sent somewhere counts as held there (until the events report it) only if it covers
# this many KV blocks: a shorter prefix (a shared system prompt's first characters) is not
# cached as a block of its own, and following it would chain unrelated prompts together
SENT_MIN_BLOCKS = 2


class TargetIndex:
    """`choose_target` over one snapshot, computed once per (pool, profile header, model)."""

    def __init__(
        self,
        config: AppConfig,
        workers: Sequence[WorkerStatus],
        pools: Mapping[str, PoolRecord] | None = None,
    ) -> None:
        self._config = config
        self._workers = workers
        self._pools = pools
        self._cache: dict[tuple[str, str | None, str], tuple[Target, list[EngineStats]]] = {}
        self._built_at = float("inf")
        self._valid_until = float("-inf")

    def choose(self, request: GenerationRequest, now: float) -> Target:
        if not self._built_at <= now < self._valid_until:
            self._rebuild(now)
        key = (request_pool(request), request.machine_profile, request.model)
        found = self._cache.get(key)
        if found is None:
            # without its prompt: what does not depend on the request's size
            bare = dataclasses.replace(request, prompt=None, openai=None)
            target = choose_target(self._config, self._workers, bare, now, self._pools)
            ready = set(target.ready_workers)
            engines = [
                status.stats
                for worker in self._workers
                if worker.worker_id in ready
                and (status := worker.model_state(request.model)) is not None
                and status.stats is not None
            ]
            # check_prompt_fits needs only the largest bound and the longest context
            bounded = [e for e in engines if e.max_prompt_chars is not None]
            summary = [
                max(bounded, key=lambda e: e.max_prompt_chars or 0, default=None),
                max(engines, key=lambda e: e.max_model_len, default=None),
            ]
            found = self._cache[key] = (target, [e for e in summary if e is not None])
        target, engines_summary = found
        check_prompt_fits(request, engines_summary)
        return target

    def _rebuild(self, now: float) -> None:
        """Valid from `now` until the first live worker turns stale."""
        stale = self._config.worker_stale_seconds
        self._cache.clear()
        self._built_at = now
        self._valid_until = min(
            (w.reported_at + stale for w in self._workers if now - w.reported_at <= stale),
            default=float("inf"),
        )


@dataclass(slots=True, eq=False)
class _Group:
    model: str
    ready: tuple[str, ...]
    members: frozenset[str]
    loads: dict[str, WorkerLoad]
    heap: list[tuple[int, str]] = field(default_factory=list)
    homes: OrderedDict[str, str] = field(default_factory=OrderedDict)
    ordered: tuple[str, ...] = ()  # `ready` by id: the same on every replica

    def rebuild(self) -> None:
        self.heap = [(load.load, worker) for worker, load in self.loads.items()]
        heapq.heapify(self.heap)


class RoutingBoard:
    """One ingress replica's routing state: worker loads per target group, and the prefixes
    it sent where. `update` whenever a worker's requests in flight (from this replica) or its
    stats change; `choose` per request (it records the request's keys at the chosen worker)."""

    def __init__(
        self,
        max_imbalance: int,
        prefix_capacity: int = 4096,
        kv_events: bool = False,
        clock: Callable[[], float] = time.monotonic,
        prefix_threshold: float = 0.0,
    ) -> None:
        self.max_imbalance = max_imbalance
        self.prefix_threshold = prefix_threshold
        self.kv_events = kv_events
        # what the engines report they hold (`kv_keys`), or what this replica sent where
        self.index: PrefixIndex | ReportedKeys = (
            ReportedKeys(clock) if kv_events else PrefixIndex(prefix_capacity)
        )
        self.wanted: set[tuple[str, str]] = set()  # (worker, model): fetch its whole key set
        self._raw: dict[str, tuple[int, Mapping[str, object] | None]] = {}
        self._groups: OrderedDict[tuple[str, tuple[str, ...]], _Group] = OrderedDict()
        self._last: dict[int, _Group] = {}  # id(ready) -> its group: no hashing of the tuple
        self._of_worker: dict[str, list[_Group]] = {}

    def update(self, worker_id: str, ongoing: int, stats: Mapping[str, object] | None) -> None:
        """`ongoing`: requests this replica has in flight there; `stats`: the worker's last
        routing stats (`affinity.routing_stats`), None while unknown."""
        self._raw[worker_id] = (ongoing, stats)
        if stats is not None and isinstance(self.index, ReportedKeys):
            self._reported(worker_id, stats)
        for group in self._of_worker.get(worker_id, ()):
            load = worker_load(worker_id, ongoing, stats, group.model)
            if load != group.loads[worker_id]:
                group.loads[worker_id] = load
                heapq.heappush(group.heap, (load.load, worker_id))
                if len(group.heap) > HEAP_SLACK * len(group.loads) + 16:
                    group.rebuild()

    def _reported(self, worker_id: str, stats: Mapping[str, object]) -> None:
        """The key changes an acknowledgement carries, per model (`kv_keys.WorkerKeys`)."""
        assert isinstance(self.index, ReportedKeys)
        by_model = stats.get("kv")
        if not isinstance(by_model, Mapping):
            return
        for model, kv in by_model.items():
            summary = kv.get("keys") if isinstance(kv, Mapping) else None
            if isinstance(summary, list) and self.index.apply(worker_id, model, summary):
                self.wanted.add((worker_id, model))

    def forget(self, worker_id: str) -> None:
        """The worker left: nothing known of it (a worker of that id later starts afresh)."""
        self.update(worker_id, 0, None)
        self._raw.pop(worker_id, None)
        self.index.forget(worker_id)

    def _group(self, model: str, ready: tuple[str, ...]) -> _Group:
        """The target group (TargetIndex hands out the same tuple for the same group, so it
        is found by identity; hashing a tuple of 1,000 ids costs more than a decision)."""
        group = self._last.get(id(ready))
        if group is not None and group.ready is ready and group.model == model:
            return group
        key = (model, ready)
        group = self._groups.get(key)
        if group is not None:
            self._groups.move_to_end(key)
            self._remember(group)
            return group
        loads = {
            worker: worker_load(worker, *self._raw.get(worker, (0, None)), model)
            for worker in ready
        }
        group = self._groups[key] = _Group(
            model, ready, frozenset(ready), loads, ordered=tuple(sorted(ready))
        )
        group.rebuild()
        self._remember(group)
        for worker in ready:
            self._of_worker.setdefault(worker, []).append(group)
        while len(self._groups) > GROUPS_KEPT:
            _, old = self._groups.popitem(last=False)
            self._last.pop(id(old.ready), None)
            for worker in old.members:
                kept = [g for g in self._of_worker.get(worker, ()) if g is not old]
                if kept:
                    self._of_worker[worker] = kept
                else:
                    self._of_worker.pop(worker, None)
        return group

    def _remember(self, group: _Group) -> None:
        if len(self._last) > GROUPS_KEPT:
            self._last.clear()
        self._last[id(group.ready)] = group

    def choose(
        self, ready: tuple[str, ...], request: GenerationRequest, record: bool = True
    ) -> RouteDecision:
        """`affinity.rank`'s decision over `ready` (its `order` holds the chosen worker only)."""
        group = self._group(request.model, ready)
        keys = affinity_keys(request)
        explicit = bool(request.prompt_cache_key or request.routing_key)  # its one key
        needs: dict[int, int] = {}

        def need_of(load: WorkerLoad) -> int:
            size = load.kv_block_size
            if not size:
                return 0  # rank's need is 0 without a block size
            need = needs.get(size)
            if need is None:
                need = needs[size] = estimated_blocks(request, size)
            return need

        def fits(load: WorkerLoad) -> bool:
            if load.kv_free_blocks is None or not load.kv_block_size:
                return True
            return load.kv_free_blocks >= need_of(load)

        least = self._least_fitting(group, fits)
        if least is None:
            queue = min(group.loads.values(), key=lambda w: (w.kv_waiting, w.load, w.worker_id))
            return self._decided(queue, "no_headroom", 0, keys, record, explicit)
        if not keys:
            return self._decided(least, "least_loaded", 0, keys, record, explicit)
        affine, reason, match = self._affine(group, keys, need_of)
        if not fits(affine):
            return self._decided(
                least, "headroom", self.index.match(least.worker_id, keys), keys, record, explicit
            )
        if affine.load - least.load > self.max_imbalance:
            return self._decided(
                least, "imbalance", self.index.match(least.worker_id, keys), keys, record, explicit
            )
        return self._decided(affine, reason, match, keys, record, explicit)

    def _decided(
        self,
        worker: WorkerLoad,
        reason: str,
        match: int,
        keys: Sequence[str],
        record: bool,
        explicit: bool = False,
    ) -> RouteDecision:
        if record:
            if not self.kv_events:
                self.index.record(worker.worker_id, keys)
            elif worker.kv_block_size:
                # the first key it is not known to hold, if long enough to follow (a caller's
                # explicit key always is: it names the session)
                position = match if explicit else max(match, _sent_from(worker.kv_block_size))
                if position < len(keys):
                    self.index.record(worker.worker_id, (keys[position],))
        return RouteDecision((worker.worker_id,), reason, match)

    @staticmethod
    def _least_fitting(group: _Group, fits: Callable[[WorkerLoad], bool]) -> WorkerLoad | None:
        """The first worker by (load, id) that fits: stale heap entries are dropped, the ones
        that do not fit put back."""
        heap, loads = group.heap, group.loads
        skipped: list[tuple[int, str]] = []
        found = None
        while heap:
            entry = heap[0]
            load = loads[entry[1]]
            if load.load != entry[0]:
                heapq.heappop(heap)  # a stale entry: a newer one is in the heap
                continue
            if fits(load):
                found = load
                break
            skipped.append(heapq.heappop(heap))
        for entry in skipped:
            heapq.heappush(heap, entry)
        return found

    def _affine(
        self, group: _Group, keys: Sequence[str], need_of: Callable[[WorkerLoad], int]
    ) -> tuple[WorkerLoad, str, int]:
        """`affinity._affine` over the workers holding the first key (every other worker
        matches none), else the first key's rendezvous home in the group; with KV events, the
        first held key (the leading keys shorter than a KV block are never held), else the
        place with the most cache room (`_placed`)."""
        index, members = self.index, group.members
        start = 0
        holders = index.holders(keys[0]) & members
        if not holders and self.kv_events:
            for start in range(1, len(keys)):
                found = index.holders(keys[start])
                if found and (holders := found & members):
                    break
        loads = group.loads
        if holders:
            # the workers holding the longest run of leading keys: intersect key by key
            depth = start + 1
            for key in keys[depth:]:
                deeper = holders & index.holders(key)
                if not deeper:
                    break
                holders, depth = deeper, depth + 1
            best = max((loads[w] for w in holders), key=lambda w: (-w.load, w.worker_id))
            if followed(depth, len(keys), self.prefix_threshold):
                return best, "prefix", depth
        else:
            depth = 0
        if self.kv_events:
            placed = self._placed(group, keys[-1], need_of)
            return placed, "room", self.index.match(placed.worker_id, keys) if depth else 0
        first = keys[depth]  # the first key past what is held
        home = group.homes.get(first)
        if home is None:
            home = group.homes[first] = rendezvous_home(first, loads)
            if len(group.homes) > HOMES_KEPT:
                group.homes.popitem(last=False)
        return loads[home], "home", self.index.match(home, keys) if depth else 0

    def _placed(self, group: _Group, key: str, need_of: Callable[[WorkerLoad], int]) -> WorkerLoad:
        """A prefix no engine holds (or too little of it): of two workers picked by its last
        key (the same two, in the same order, on every replica), the first unless the
        second's cache has room for more than the request's blocks beyond the first's. Room:
        KV blocks less the blocks the engine reports cached. Two choices keep it O(1) at any
        fleet size; the margin keeps replicas whose reports differ by a request or two
        agreeing."""
        ordered, loads = group.ordered, group.loads
        count = len(ordered)
        if count == 1:
            return loads[ordered[0]]
        pick = int(key, 16)
        first = pick % count
        second = (pick // count) % (count - 1)
        a, b = ordered[first], ordered[second + (second >= first)]
        if digest(f"{key}\x00{a}") < digest(f"{key}\x00{b}"):
            a, b = b, a  # rendezvous order of the two
        room_a, room_b = self._room(loads[a], group.model), self._room(loads[b], group.model)
        if room_a is not None and room_b is not None and room_b - room_a > need_of(loads[a]):
            return loads[b]
        return loads[a]

    def _room(self, load: WorkerLoad, model: str) -> float | None:
        """KV blocks not holding a cached prefix, as the engine's reports tell."""
        size = load.kv_block_size
        total = load.kv_total_blocks if load.kv_total_blocks is not None else load.kv_free_blocks
        if total is None or not size:
            return None
        assert isinstance(self.index, ReportedKeys)
        return total - self.index.held_count(load.worker_id, model) * KEY_TOKENS / size


def _sent_from(block_size: int) -> int:
    """The first key position covering `SENT_MIN_BLOCKS` KV blocks (by the token estimate)."""
    blocks = SENT_MIN_BLOCKS * block_size * CHARS_PER_TOKEN_ESTIMATE / BLOCK_CHARS
    return max(0, math.ceil(blocks) - 1)


__all__ = ["RoutingBoard", "TargetIndex"]
