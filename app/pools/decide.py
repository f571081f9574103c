"""The pool autoscaler's decision, as a pure function of a snapshot:

    decide(snapshot, config, now) -> Decision(targets, assignments, states, reasons)

1. Pools whose lease lapsed are `expired` and hold nothing. Shared pools hold nothing either
   (their requests run on their queue pool's workers): they are `active` while leased.
2. Every (pool, profile) *wants* workers: the `gpus` requirement, the pool's share of
   `minimum_worker_count`, and demand (a recent request that found no worker -> at least one;
   busy workers -> one per `target_ongoing_requests`), never above `gpu_caps`. The default pool
   wants the profile's `num_replicas` plus its own demand. A want that drops is held until the
   scale-down cooldown has passed.
3. Wants are granted in order (default base, then pools oldest first, then extra default
   demand) up to what the cluster can place and the profile's `max_replicas`. The default
   pool's growth under load stops at `load_capacity`: a worker only where it adds compute
   (a CPU engine's threads use every core of its node, so a second one there halves both).
4. The replica target per profile is the sum of grants: up at once, down after the cooldown.
5. Live workers are assigned: previous assignments stay while still granted (stability), then
   pools take free workers (ready ones first), the rest serve the default pool.
6. A pool is `active` when every profile of its `gpus` has that many ready workers assigned.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from app.config import AppConfig
from app.pools.model import DEFAULT_POOL, PoolRecord, PoolState
from app.protocol.workers import WorkerStatus

UNBOUNDED = 1 << 30

DecisionKind = Literal[
    "scale_up",
    "scale_down",
    "scale_down_held",
    "capacity_exhausted",
    "worker_assigned",
    "pool_state",
    "pool_expired",
    "other",
]
"""What a reason is about: the `kind` label of `poolserve_autoscaler_decisions_total` and of the
dashboard's decisions ("other": e.g. a worker the autoscaler forgot because Serve stopped it)."""


@dataclass(frozen=True, slots=True)
class Reason:
    """One thing a decision did and why: a bounded `kind` for metrics and the dashboard, and the
    sentence people read in logs, /health and the dashboard."""

    kind: DecisionKind
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What a decision needs to know about one live worker."""

    worker_id: str
    profile: str
    loaded_models: frozenset[str]
    loading: bool = False
    active_requests: int = 0

    @classmethod
    def of(cls, status: WorkerStatus) -> WorkerView:
        return cls(
            worker_id=status.worker_id,
            profile=status.profile,
            loaded_models=frozenset(status.loaded_models),
            loading=any(model.state == "loading" for model in status.models),
            active_requests=status.active_requests,
        )

    def ready_for(self, pinned: Sequence[str]) -> bool:
        if self.loading or not self.loaded_models:
            return False
        return all(model in self.loaded_models for model in pinned)


@dataclass(frozen=True, slots=True)
class Snapshot:
    pools: Mapping[str, PoolRecord]
    workers: Sequence[WorkerView]
    """Live workers only (the caller drops stale heartbeats)."""
    assignments: Mapping[str, str] = field(default_factory=dict)
    """The previous decision's worker id -> pool."""
    replicas: Mapping[str, int] = field(default_factory=dict)
    """The replica target currently applied per profile (absent: the profile's num_replicas)."""
    capacity: Mapping[str, int | None] = field(default_factory=dict)
    """Most workers of a profile the cluster's resources can place (absent/None: no limit)."""
    load_capacity: Mapping[str, int | None] = field(default_factory=dict)
    """Most workers of a profile that add compute, the bound of growth under load (absent/None:
    `capacity`). For a profile without GPUs, one per node: its engine already runs on every
    core there."""
    demand: Mapping[tuple[str, str], float] = field(default_factory=dict)
    """(pool, profile) -> last time a request found no worker there."""
    shrink_since: Mapping[str, float] = field(default_factory=dict)
    """Key ('profile' or 'pool/profile') -> since when a smaller want has held."""


@dataclass(frozen=True, slots=True)
class Decision:
    targets: dict[str, int]
    assignments: dict[str, str]
    states: dict[str, PoolState]
    shrink_since: dict[str, float]
    reasons: tuple[Reason, ...]
    granted: dict[str, dict[str, int]] = field(default_factory=dict)
    """pool -> profile -> workers granted (after caps and cluster capacity)."""
    readiness: dict[str, str] = field(default_factory=dict)
    """pool -> why it is pending or active, e.g. '0/1 ready on l4' (for /health and logs)."""


def decide(snapshot: Snapshot, config: AppConfig, now: float) -> Decision:
    reasons: list[Reason] = []
    cooldown = config.pools.scale_down_cooldown_seconds
    shrink_since: dict[str, float] = {}
    states: dict[str, PoolState] = {}
    live: list[PoolRecord] = []
    for record in sorted(snapshot.pools.values(), key=lambda r: (r.created_at, r.name)):
        if record.lapsed(now):
            states[record.name] = "expired"
            if record.state != "expired":
                reasons.append(
                    Reason(
                        "pool_expired",
                        f"pool '{record.name}' expired (not renewed for {record.lease_seconds:g} "
                        "s); its workers return to the default pool",
                    )
                )
        elif record.spec.shared:  # holds no workers: active while its lease holds
            states[record.name] = "active"
            if record.state != "active":
                reasons.append(
                    Reason(
                        "pool_state",
                        f"pool '{record.name}' active: shares the workers of "
                        f"'{record.spec.queue_pool}'",
                    )
                )
        else:
            live.append(record)

    by_profile: dict[str, list[WorkerView]] = {p.name: [] for p in config.profiles}
    for worker in sorted(snapshot.workers, key=lambda w: w.worker_id):
        if worker.profile in by_profile:
            by_profile[worker.profile].append(worker)
    held = Counter(
        (pool, worker.profile)
        for worker in snapshot.workers
        if (pool := snapshot.assignments.get(worker.worker_id, DEFAULT_POOL)) != DEFAULT_POOL
    )
    # indexes by pool, so that each pool costs its own workers and demand, not everyone's
    held_profiles: dict[str, set[str]] = {}
    for pool, profile in held:
        held_profiles.setdefault(pool, set()).add(profile)
    demand_profiles: dict[str, set[str]] = {}
    for pool, profile in snapshot.demand:
        if profile in by_profile:
            demand_profiles.setdefault(pool, set()).add(profile)
    active: Counter[tuple[str, str]] = Counter()
    for profile, members in by_profile.items():
        for w in members:
            active[(snapshot.assignments.get(w.worker_id, DEFAULT_POOL), profile)] += (
                w.active_requests
            )

    def recent_demand(pool: str, profile: str) -> bool:
        seen = snapshot.demand.get((pool, profile))
        return seen is not None and now - seen <= config.pools.demand_window_seconds

    def busy(pool: str, profile: str) -> int:
        return math.ceil(active[(pool, profile)] / config.pools.target_ongoing_requests)

    def hold(key: str, wanted: int, current: int) -> int:
        if wanted >= current:
            return wanted
        started = snapshot.shrink_since.get(key, now)
        if now - started >= cooldown:
            return wanted
        shrink_since[key] = started
        return current

    # 2. wants
    wants: dict[str, dict[str, int]] = {}
    for record in live:
        spec = record.spec
        profiles = spec.profiles() or sorted(
            demand_profiles.get(record.name, set())
            | held_profiles.get(record.name, set())
            | ({config.profiles[0].name} if spec.minimum_worker_count else set())
        )
        want: dict[str, int] = {}
        for profile in profiles:
            demand = max(
                busy(record.name, profile), 1 if recent_demand(record.name, profile) else 0
            )
            want[profile] = max(spec.gpus.get(profile, 0), demand)
        deficit = spec.minimum_worker_count - sum(want.values())
        for profile in profiles:
            if deficit <= 0:
                break
            cap = spec.cap(profile)
            room = deficit if cap is None else max(0, min(deficit, cap - want[profile]))
            want[profile] += room
            deficit -= room
        for profile in profiles:
            cap = spec.cap(profile)
            capped = want[profile] if cap is None else min(want[profile], cap)
            current = held[(record.name, profile)]
            current = current if cap is None else min(current, cap)
            want[profile] = hold(f"{record.name}/{profile}", capped, current)
        wants[record.name] = want

    # 3. grants, 4. targets
    granted: dict[str, dict[str, int]] = {DEFAULT_POOL: {}}
    targets: dict[str, int] = {}
    for profile_config in config.profiles:
        profile = profile_config.name
        limits = [profile_config.max_replicas, snapshot.capacity.get(profile)]
        upper = min([limit for limit in limits if limit is not None], default=UNBOUNDED)
        left = upper
        base = min(profile_config.num_replicas, left)
        left -= base
        short: list[str] = []
        for record in live:
            wanted = wants[record.name].get(profile, 0)
            got = min(wanted, left)
            left -= got
            if wanted:
                granted.setdefault(record.name, {})[profile] = got
            if got < wanted:
                short.append(f"pool '{record.name}' gets {got} of {wanted}")
        load_limit = snapshot.load_capacity.get(profile)
        load_room = UNBOUNDED if load_limit is None else max(0, load_limit - (upper - left))
        from_load = min(max(0, busy(DEFAULT_POOL, profile) - base), load_room)
        from_demand = 1 if recent_demand(DEFAULT_POOL, profile) and base == 0 else 0
        extra = min(max(from_load, from_demand), left)
        granted[DEFAULT_POOL][profile] = base + extra
        desired = sum(g.get(profile, 0) for g in granted.values())
        current = snapshot.replicas.get(profile, profile_config.num_replicas)
        target = min(hold(profile, desired, current), upper)
        targets[profile] = target
        if short:
            reasons.append(
                Reason(
                    "capacity_exhausted",
                    f"{profile}: capacity exhausted (the cluster fits {upper} workers): "
                    + ", ".join(short),
                )
            )
        if target != current:
            parts = [f"{pool} {g[profile]}" for pool, g in granted.items() if g.get(profile)]
            why = ", ".join(parts) or "nothing wants workers"
            kind: DecisionKind = "scale_up" if target > current else "scale_down"
            reasons.append(Reason(kind, f"{profile}: {current} -> {target} workers ({why})"))
        elif desired < current and profile in shrink_since:
            left_s = cooldown - (now - shrink_since[profile])
            if snapshot.shrink_since.get(profile) is None:
                reasons.append(
                    Reason(
                        "scale_down_held",
                        f"{profile}: keeping {current} workers (want {desired}) "
                        f"until the {cooldown:g} s cooldown ends in {left_s:.0f} s",
                    )
                )

    # 5. assignments
    assignments: dict[str, str] = {}
    for profile, workers in by_profile.items():
        counts: Counter[str] = Counter()
        for worker in workers:
            previous = snapshot.assignments.get(worker.worker_id, DEFAULT_POOL)
            if previous == DEFAULT_POOL:
                continue
            if counts[previous] < granted.get(previous, {}).get(profile, 0):
                assignments[worker.worker_id] = previous
                counts[previous] += 1
        # free workers in the order a pool takes them (ready ones first), sorted once per
        # pinned set: taking workers never reorders the rest, so each order is walked once
        orders: dict[tuple[str, ...], tuple[list[WorkerView], list[int]]] = {}
        for record in live:
            name = record.name
            need = granted.get(name, {}).get(profile, 0) - counts[name]
            if need <= 0:
                continue
            pinned = record.spec.pinned_for(profile)
            order, position = orders.get(tuple(pinned)) or orders.setdefault(
                tuple(pinned),
                (
                    sorted(
                        workers,
                        key=lambda w: (not w.ready_for(pinned), w.active_requests, w.worker_id),
                    ),
                    [0],
                ),
            )
            taken: list[WorkerView] = []
            while len(taken) < need and position[0] < len(order):
                candidate = order[position[0]]
                position[0] += 1
                if candidate.worker_id not in assignments:
                    taken.append(candidate)
            for worker in taken:
                assignments[worker.worker_id] = record.name
                counts[record.name] += 1
                reasons.append(
                    Reason(
                        "worker_assigned",
                        f"worker {worker.worker_id} ({profile}) -> pool '{record.name}'",
                    )
                )
        for worker in workers:
            if worker.worker_id not in assignments:
                assignments[worker.worker_id] = DEFAULT_POOL
                previous = snapshot.assignments.get(worker.worker_id, DEFAULT_POOL)
                if previous != DEFAULT_POOL:
                    reasons.append(
                        Reason(
                            "worker_assigned",
                            f"worker {worker.worker_id} ({profile}) -> default pool",
                        )
                    )

    # 6. readiness
    readiness: dict[str, str] = {}
    views = {w.worker_id: w for w in snapshot.workers}
    assigned: dict[str, list[WorkerView]] = {}
    for worker_id, pool in assignments.items():
        assigned.setdefault(pool, []).append(views[worker_id])
    for record in live:
        spec = record.spec
        missing = []
        for profile, required in sorted(spec.gpus.items()):
            pinned = spec.pinned_for(profile)
            ready = sum(
                1
                for view in assigned.get(record.name, ())
                if view.profile == profile and view.ready_for(pinned)
            )
            if ready < required:
                missing.append(f"{ready}/{required} ready on {profile}")
        state: PoolState = "pending" if missing else "active"
        states[record.name] = state
        detail = ", ".join(missing) if missing else "requirement met"
        readiness[record.name] = detail
        if state != record.state:
            reasons.append(Reason("pool_state", f"pool '{record.name}' {state}: {detail}"))

    return Decision(
        targets=targets,
        assignments=assignments,
        states=states,
        shrink_since=shrink_since,
        reasons=tuple(reasons),
        granted=granted,
        readiness=readiness,
    )
