"""Fair admission to one engine's KV cache: which waiting request goes next, how much room to
keep for others, and whom to refuse when the queue is full. Pure: the caller passes the time.

- Priority first (vLLM's semantics: a lower value is served earlier).
- Within a priority, the pool holding the fewest KV blocks per unit of `weight` (its `gpus`)
  goes next, so admission is shared in proportion to the weights and no pool waits behind
  another's backlog.
- Headroom: a request may not take the room kept for flows that are active (sent a request in
  the last `active_s`) and either outrank it or are of its priority and under their share: room
  for `headroom_requests` of their recent size. So a light tenant is admitted at once, not when
  the next of a heavy tenant's requests ends. An idle engine admits anything that fits.
- Queue full: the newcomer displaces the newest waiter of the lowest-ranked flow (lowest
  priority, then most waiting per weight) when that flow ranks below it; otherwise it is
  refused. The heavy tenant absorbs the refusals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Flow:
    """Who a request is for: its pool (the tenant), priority and the pool's share weight."""

    pool: str = "default"
    priority: int = 0
    weight: float = 1.0


@dataclass(slots=True)
class _Seen:
    weight: float
    last_at: float
    blocks: int  # the most recent request's size


@dataclass(slots=True)
class FairShare:
    headroom_requests: int = 2
    active_s: float = 10.0
    held: dict[str, int] = field(default_factory=dict)
    """pool -> KV blocks its admitted requests hold now."""
    _seen: dict[tuple[int, str], _Seen] = field(default_factory=dict)

    def arrived(self, flow: Flow, blocks: int, now: float) -> None:
        self._seen[(flow.priority, flow.pool)] = _Seen(flow.weight, now, blocks)

    def admitted(self, flow: Flow, blocks: int) -> None:
        self.held[flow.pool] = self.held.get(flow.pool, 0) + blocks

    def released(self, flow: Flow, blocks: int) -> None:
        left = self.held.get(flow.pool, 0) - blocks
        if left > 0:
            self.held[flow.pool] = left
        else:
            self.held.pop(flow.pool, None)

    def rank(self, flow: Flow) -> tuple[int, float]:
        """Lower goes first: priority, then blocks held per weight."""
        return flow.priority, self.held.get(flow.pool, 0) / max(flow.weight, 1e-9)

    def _active(self, now: float) -> dict[tuple[int, str], _Seen]:
        stale = [key for key, seen in self._seen.items() if now - seen.last_at > self.active_s]
        for key in stale:
            del self._seen[key]
        return self._seen

    def reserved_for_others(self, flow: Flow, total_blocks: int, now: float) -> int:
        """KV blocks `flow`'s request must leave free for other active flows."""
        active = self._active(now)
        peers = {
            pool: seen.weight
            for (priority, pool), seen in active.items()
            if priority == flow.priority
        }
        peers[flow.pool] = flow.weight
        weights = sum(peers.values())
        reserve = 0.0
        for (priority, pool), seen in active.items():
            if pool == flow.pool and priority == flow.priority:
                continue
            room = self.headroom_requests * seen.blocks
            if priority < flow.priority:
                reserve += room
            elif priority == flow.priority:
                share = total_blocks * seen.weight / weights
                reserve += min(room, max(0.0, share - self.held.get(pool, 0)))
        return int(reserve)

    def may_admit(
        self, flow: Flow, new_blocks: int, free_blocks: int, total_blocks: int, now: float
    ) -> bool:
        """Whether a request of `flow` needing `new_blocks` may take them now."""
        if new_blocks > free_blocks:
            return False
        if free_blocks == total_blocks:
            return True  # an idle engine admits anything that fits
        return new_blocks <= free_blocks - self.reserved_for_others(flow, total_blocks, now)


def next_waiter(flows: Sequence[Flow], fair: FairShare) -> int | None:
    """Index of the waiter to admit next (`flows` in arrival order), or None if none wait."""
    if not flows:
        return None
    return min(range(len(flows)), key=lambda index: (*fair.rank(flows[index]), index))


def displaced(waiting: Sequence[Flow], incoming: Flow) -> int | None:
    """When the queue is full: the index of the waiter `incoming` displaces (the newest of the
    lowest-ranked flow, if that ranks below `incoming`), or None to refuse `incoming`."""
    counts = _waiting_per_pool(waiting)

    def load(flow: Flow, extra: int = 0) -> float:
        return (counts.get((flow.priority, flow.pool), 0) + extra) / max(flow.weight, 1e-9)

    worst: int | None = None
    for index, flow in enumerate(waiting):
        if worst is None or (flow.priority, load(flow), index) >= (
            waiting[worst].priority,
            load(waiting[worst]),
            worst,
        ):
            worst = index
    if worst is None:
        return None
    victim = waiting[worst]
    if victim.priority > incoming.priority:
        return worst
    if victim.priority == incoming.priority and victim.pool != incoming.pool:
        if load(victim) > load(incoming, extra=1):
            return worst
    return None


def _waiting_per_pool(waiting: Iterable[Flow]) -> dict[tuple[int, str], int]:
    counts: dict[tuple[int, str], int] = {}
    for flow in waiting:
        key = (flow.priority, flow.pool)
        counts[key] = counts.get(key, 0) + 1
    return counts
