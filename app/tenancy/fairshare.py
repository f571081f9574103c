"""Fair admission to one engine's KV cache: which waiting request goes next, how much room to
keep for others, and whom to refuse when the queue is full. Pure: the caller passes the time.

- Priority first (vLLM's semantics: a lower value is served earlier).
- Within a priority, the pool holding the fewest KV blocks per unit of `weight` (its `gpus`)
  goes next, so admission is shared in proportion to the weights and no pool waits behind
  another's backlog.
- Headroom: a request may not take the room kept for flows that are active (a request of
  theirs runs, or arrived or ended in the last `active_s`) and either outrank it or are of its
  priority and under their share: room for `headroom_requests` of their recent size. So a
  light tenant is admitted at once, not when the next of a heavy tenant's requests ends. An
  idle engine admits anything that fits.
- The engine's batch (`batch_requests`, 0: not shared): while other flows are active, a flow
  over its weighted share of that many running engine requests waits until the batch has room
  beside the headroom kept for the others, so a light tenant's request never queues and does
  not share its steps with a heavy tenant's whole backlog (the KV cache is rarely what fills
  first: the batch is what tenants share). Alone, a flow runs as the engine allows. A pool
  that shares by key (`Flow.member`: its API key) splits its share of the batch equally among
  its active keys.
- Queue full: the newcomer displaces the newest waiter of the lowest-ranked flow (lowest
  priority, then most waiting per weight) when that flow ranks below it; otherwise it is
  refused. The heavy tenant absorbs the refusals.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Flow:
    """Who a request is for: its pool (the tenant), priority and the pool's share weight."""

    pool: str = "default"
    priority: int = 0
    weight: float = 1.0
    member: str = ""
    """Who within the pool shares its part of the batch equally with the pool's other
    active members (its API key's id, when the pool shares by key); "": the pool as one."""


@dataclass(slots=True)
class _Seen:
    weight: float
    last_at: float
    blocks: int  # the most recent request's size


@dataclass(slots=True)
class FairShare:
    headroom_requests: int = 2
    active_s: float = 10.0
    batch_requests: int = 0
    held: dict[str, int] = field(default_factory=dict)
    """pool -> KV blocks its admitted requests hold now."""
    running: dict[tuple[int, str, str], int] = field(default_factory=dict)
    """(priority, pool, member) -> its engine requests admitted and not yet ended."""
    _seen: dict[tuple[int, str], _Seen] = field(default_factory=dict)
    _members: dict[tuple[int, str], dict[str, float]] = field(default_factory=dict)
    """(priority, pool) -> member -> when it last sent a request."""

    def arrived(self, flow: Flow, blocks: int, now: float) -> None:
        self._seen[(flow.priority, flow.pool)] = _Seen(flow.weight, now, blocks)
        self._members.setdefault((flow.priority, flow.pool), {})[flow.member] = now

    def admitted(self, flow: Flow, blocks: int) -> None:
        self.held[flow.pool] = self.held.get(flow.pool, 0) + blocks
        key = (flow.priority, flow.pool, flow.member)
        self.running[key] = self.running.get(key, 0) + 1

    def released(self, flow: Flow, blocks: int, now: float) -> None:
        """A request ended: its flow stays active `active_s` from now (one whose requests each
        run longer than `active_s` would otherwise be idle the moment one ends, and a heavy
        flow's waiter would take the seat kept for its next)."""
        seen = self._seen.get((flow.priority, flow.pool))
        if seen is not None:
            seen.last_at = max(seen.last_at, now)
            self._members.setdefault((flow.priority, flow.pool), {})[flow.member] = now
        left = self.held.get(flow.pool, 0) - blocks
        if left > 0:
            self.held[flow.pool] = left
        else:
            self.held.pop(flow.pool, None)
        key = (flow.priority, flow.pool, flow.member)
        running = self.running.get(key, 0) - 1
        if running > 0:
            self.running[key] = running
        else:
            self.running.pop(key, None)

    def rank(self, flow: Flow) -> tuple[int, float, int]:
        """Lower goes first: priority, then blocks held per weight, then (members of one
        pool) engine requests running."""
        return (
            flow.priority,
            self.held.get(flow.pool, 0) / max(flow.weight, 1e-9),
            self.running.get((flow.priority, flow.pool, flow.member), 0),
        )

    def _active(self, now: float) -> dict[tuple[int, str], _Seen]:
        """Flows with a request that arrived or ended in the last `active_s`, or one running (a
        tenant whose requests all wait or run long sends none meanwhile, and is no less
        active)."""
        busy = {(priority, pool) for priority, pool, _ in self.running}
        stale = [
            key
            for key, seen in self._seen.items()
            if now - seen.last_at > self.active_s and key not in busy
        ]
        for key in stale:
            del self._seen[key]
            self._members.pop(key, None)
        return self._seen

    def _batch_flows(self, now: float) -> dict[tuple[int, str, str], float]:
        """Active (priority, pool, member) -> its weight: its pool's, split equally among the
        pool's active members."""
        flows: dict[tuple[int, str, str], float] = {}
        for (priority, pool), seen in self._active(now).items():
            members = self._members.get((priority, pool), {})
            for member in [
                m
                for m, at in members.items()
                if now - at > self.active_s and (priority, pool, m) not in self.running
            ]:
                del members[member]
            for member in members or {"": now}:
                flows[(priority, pool, member)] = seen.weight / max(1, len(members))
        return flows

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
        """Whether a request of `flow` needing `new_blocks` may take them now (the batch
        aside: `batch_allows`)."""
        if new_blocks > free_blocks:
            return False
        if free_blocks == total_blocks:
            return True  # an idle engine admits anything that fits
        return new_blocks <= free_blocks - self.reserved_for_others(flow, total_blocks, now)

    def batch_allows(self, flow: Flow, now: float) -> bool:
        """Whether one more engine request of `flow` may join the engine's batch now: always
        when no other flow is active or when it is under its weighted share of
        `batch_requests` and nothing outranks it; else only while the batch keeps
        `headroom_requests` for each higher priority and for each peer under its share."""
        cap = self.batch_requests
        if cap <= 0:
            return True
        me = (flow.priority, flow.pool, flow.member)
        flows = self._batch_flows(now)
        flows.setdefault(me, flow.weight)
        if len(flows) == 1:
            return True
        weights = sum(w for key, w in flows.items() if key[0] == flow.priority)
        outranked = any(key[0] < flow.priority for key in flows)
        if not outranked and self.running.get(me, 0) < cap * flows[me] / weights:
            return True
        reserve = 0.0
        for key, weight in flows.items():
            if key == me or key[0] > flow.priority:
                continue
            if key[0] < flow.priority:
                reserve += self.headroom_requests
            else:
                share = cap * weight / weights
                reserve += min(self.headroom_requests, max(0.0, share - self.running.get(key, 0)))
        return sum(self.running.values()) + 1 <= cap - reserve


def next_waiter(flows: Sequence[Flow], fair: FairShare, skip: Collection[Flow] = ()) -> int | None:
    """Index of the waiter to admit next (`flows` in arrival order; those of a flow in `skip`
    passed over), or None if none wait."""
    candidates = [index for index, flow in enumerate(flows) if flow not in skip]
    if not candidates:
        return None
    return min(candidates, key=lambda index: (*fair.rank(flows[index]), index))


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
