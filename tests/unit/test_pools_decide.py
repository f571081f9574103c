"""The pool autoscaler's decision function, table-tested (pure, no Ray)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from app.config import AppConfig
from app.pools.capacity import workers_that_fit
from app.pools.decide import Decision, Reason, Snapshot, WorkerView, decide
from app.pools.model import PoolRecord, PoolSpec

NOW = 10_000.0
MODEL = "org/m"
CONFIG = AppConfig.model_validate(
    {
        "models": [{"id": MODEL, "profiles": ["cpu", "l4", "a100"]}],
        "profiles": [
            {"name": "cpu", "num_replicas": 1},
            {"name": "l4", "num_gpus": 1, "num_replicas": 0},
            {"name": "a100", "num_gpus": 1, "num_replicas": 0, "max_replicas": 1},
        ],
        "pools": {"scale_down_cooldown_seconds": 60, "demand_window_seconds": 30},
    }
)


def pool(
    name: str, created_at: float = NOW - 100, lease_s: float = 1200, **spec: Any
) -> PoolRecord:
    return PoolRecord(
        spec=PoolSpec(name=name, **spec),
        created_at=created_at,
        last_renewed=created_at,
        lease_seconds=lease_s,
    )


def worker(worker_id: str, profile: str, loaded: bool = True, active: int = 0) -> WorkerView:
    return WorkerView(
        worker_id,
        profile,
        frozenset({MODEL}) if loaded else frozenset(),
        loading=not loaded,
        active_requests=active,
    )


def snap(*pools: PoolRecord, **fields: Any) -> Snapshot:
    fields.setdefault("workers", [])
    return Snapshot(pools={p.name: p for p in pools}, **fields)


def run(snapshot: Snapshot, now: float = NOW) -> Decision:
    return decide(snapshot, CONFIG, now)


# --- replica targets: caps, floors, readiness requirement, scale from zero ----------------------


@pytest.mark.parametrize(
    ("spec", "expected_l4", "why"),
    [
        ({"gpus": {"l4": 2}}, 2, "readiness requirement"),
        ({"gpus": {"l4": 2}, "gpu_caps": {"l4": 2}}, 2, "requirement within cap"),
        ({"gpu_caps": {"l4": 3}}, 0, "caps alone are lazy: no demand, no worker"),
        ({"gpu_caps": {"l4": 3}, "minimum_worker_count": 2}, 2, "warm floor"),
        ({"gpu_caps": {"l4": 1}, "minimum_worker_count": 1}, 1, "floor within cap"),
        ({"gpus": {"l4": 1}, "gpu_caps": {"l4": 4}, "minimum_worker_count": 3}, 3, "floor > gpus"),
    ],
)
def test_pool_wants_become_targets(spec: dict[str, Any], expected_l4: int, why: str) -> None:
    decision = run(snap(pool("p", **spec)))
    assert decision.targets["l4"] == expected_l4, why
    assert decision.targets["cpu"] == 1, "the default pool keeps its base capacity"


def test_scale_from_zero_on_demand_and_never_above_cap() -> None:
    record = pool("lazy", gpu_caps={"l4": 1})
    quiet = run(snap(record))
    assert quiet.targets["l4"] == 0
    wanted = run(snap(record, demand={("lazy", "l4"): NOW - 1}))
    assert wanted.targets["l4"] == 1
    assert Reason("scale_up", "l4: 0 -> 1 workers (lazy 1)") in wanted.reasons
    busy = [worker("w1", "l4", active=50)]
    capped = run(
        snap(record, workers=busy, assignments={"w1": "lazy"}, replicas={"l4": 1}),
    )
    assert capped.targets["l4"] == 1, "50 ongoing requests want 7 workers, the cap is 1"


def test_demand_beyond_window_is_ignored() -> None:
    decision = run(snap(pool("lazy", gpu_caps={"l4": 1}), demand={("lazy", "l4"): NOW - 31}))
    assert decision.targets["l4"] == 0


def test_busy_pool_scales_up_to_its_cap() -> None:
    record = pool("b", gpu_caps={"l4": 3}, gpus={"l4": 1})
    workers = [worker("w1", "l4", active=20)]
    decision = run(snap(record, workers=workers, assignments={"w1": "b"}, replicas={"l4": 1}))
    assert decision.targets["l4"] == 3  # ceil(20 / 8) = 3


def test_busy_default_pool_grows_only_where_a_worker_adds_compute() -> None:
    """Load grows the default pool up to `load_capacity` (a CPU engine per node), not up to
    what the resources could place: a second CPU engine on the same cores halves both."""
    busy = [worker("w1", "cpu", active=32)]  # ceil(32 / 8) = 4 wanted
    unbounded = run(snap(workers=busy, replicas={"cpu": 1}, capacity={"cpu": 4}))
    assert unbounded.targets["cpu"] == 4
    one_node = run(
        snap(workers=busy, replicas={"cpu": 1}, capacity={"cpu": 4}, load_capacity={"cpu": 1})
    )
    assert one_node.targets["cpu"] == 1
    two_nodes = run(
        snap(workers=busy, replicas={"cpu": 1}, capacity={"cpu": 4}, load_capacity={"cpu": 2})
    )
    assert two_nodes.targets["cpu"] == 2


def test_a_pool_still_gets_workers_beyond_the_load_capacity() -> None:
    """A pool's explicit `gpus` is a reservation, not load: it is granted up to `capacity`."""
    record = pool("eval", gpus={"cpu": 1}, gpu_caps={"cpu": 1})
    busy = [worker("w1", "cpu", active=32)]
    decision = run(
        snap(
            record, workers=busy, replicas={"cpu": 1}, capacity={"cpu": 4}, load_capacity={"cpu": 1}
        )
    )
    assert decision.granted["eval"]["cpu"] == 1
    assert decision.targets["cpu"] == 2  # the default base + the pool's one; no load growth


def test_profiles_a_pool_does_not_name_are_not_granted() -> None:
    decision = run(snap(pool("p", gpu_caps={"l4": 2}), demand={("p", "cpu"): NOW}))
    assert decision.granted.get("p", {}).get("cpu", 0) == 0
    assert decision.targets["cpu"] == 1


# --- capacity exhaustion --------------------------------------------------------------------------


def test_capacity_exhaustion_grants_oldest_pools_first() -> None:
    older = pool("older", created_at=NOW - 200, gpus={"l4": 2})
    newer = pool("newer", created_at=NOW - 100, gpus={"l4": 2})
    decision = run(snap(older, newer, capacity={"l4": 3}))
    assert decision.targets["l4"] == 3
    assert decision.granted["older"]["l4"] == 2
    assert decision.granted["newer"]["l4"] == 1
    assert any(
        r.kind == "capacity_exhausted" and "'newer' gets 1 of 2" in r.text for r in decision.reasons
    )


def test_profile_max_replicas_bounds_the_target() -> None:
    decision = run(snap(pool("big", gpus={"a100": 3})))
    assert decision.targets["a100"] == 1


def test_capacity_loss_lowers_the_target_at_once() -> None:
    decision = run(snap(pool("p", gpus={"l4": 2}), replicas={"l4": 2}, capacity={"l4": 1}))
    assert decision.targets["l4"] == 1


# --- cooldown ---------------------------------------------------------------------------------------


def test_scale_down_waits_for_the_cooldown() -> None:
    workers = [worker("c1", "cpu"), worker("c2", "cpu")]
    first = run(snap(workers=workers, replicas={"cpu": 2}))
    assert first.targets["cpu"] == 2
    assert first.shrink_since == {"cpu": NOW}
    assert any(r.kind == "scale_down_held" and "cooldown" in r.text for r in first.reasons)
    later = run(
        snap(workers=workers, replicas={"cpu": 2}, shrink_since=first.shrink_since), NOW + 59
    )
    assert later.targets["cpu"] == 2
    done = run(
        snap(workers=workers, replicas={"cpu": 2}, shrink_since=first.shrink_since), NOW + 60
    )
    assert done.targets["cpu"] == 1
    assert any(r.kind == "scale_down" and "cpu: 2 -> 1" in r.text for r in done.reasons)


def test_scale_up_is_immediate_and_resets_the_cooldown() -> None:
    decision = run(
        snap(pool("p", gpus={"cpu": 2}), replicas={"cpu": 2}, shrink_since={"cpu": NOW - 59})
    )
    assert decision.targets["cpu"] == 3
    assert "cpu" not in decision.shrink_since


def test_a_lazy_pool_keeps_its_worker_through_the_cooldown() -> None:
    record = pool("lazy", gpu_caps={"l4": 1})
    base = snap(
        record, workers=[worker("w1", "l4")], assignments={"w1": "lazy"}, replicas={"l4": 1}
    )
    idle = run(base)
    assert idle.assignments["w1"] == "lazy"
    assert idle.targets["l4"] == 1
    released = run(replace(base, shrink_since=idle.shrink_since), NOW + 61)
    assert released.assignments["w1"] == "default"


# --- floors -----------------------------------------------------------------------------------------


def test_never_below_the_default_floor() -> None:
    decision = run(snap(replicas={"cpu": 0}, shrink_since={"cpu": NOW - 1000}))
    assert decision.targets["cpu"] == 1


def test_warm_floor_holds_even_when_idle_past_cooldown() -> None:
    record = pool("warm", gpu_caps={"l4": 2}, minimum_worker_count=1)
    workers = [worker("w1", "l4"), worker("w2", "l4")]
    decision = run(
        snap(
            record,
            workers=workers,
            assignments={"w1": "warm", "w2": "warm"},
            replicas={"l4": 2},
            shrink_since={"l4": NOW - 1000, "warm/l4": NOW - 1000},
        )
    )
    assert decision.targets["l4"] == 1
    assert sorted(w for w, p in decision.assignments.items() if p == "warm") == ["w1"]


# --- readiness and assignments ------------------------------------------------------------------


def test_pool_is_pending_until_its_workers_are_ready() -> None:
    record = pool("r", gpus={"cpu": 1})
    loading = run(snap(record, workers=[worker("c1", "cpu", loaded=False)], replicas={"cpu": 2}))
    assert loading.states["r"] == "pending"
    assert loading.assignments["c1"] == "r"
    assert loading.readiness["r"] == "0/1 ready on cpu"
    ready = run(snap(record, workers=[worker("c1", "cpu")], assignments={"c1": "r"}))
    assert ready.states["r"] == "active"


def test_pool_takes_a_loaded_worker_first_and_new_ones_go_to_default() -> None:
    record = pool("fast", gpus={"cpu": 1})
    workers = [worker("a", "cpu", loaded=False), worker("b", "cpu")]
    decision = run(snap(record, workers=workers, replicas={"cpu": 2}))
    assert decision.assignments == {"a": "default", "b": "fast"}
    assert decision.states["fast"] == "active"


def test_pinned_models_decide_readiness() -> None:
    record = pool("pin", gpus={"cpu": 1}, pinned_models=("org/other",))
    decision = run(snap(record, workers=[worker("c1", "cpu")], replicas={"cpu": 2}))
    assert decision.states["pin"] == "pending"


def test_assignments_are_stable_when_nothing_changes() -> None:
    pools = (pool("a", gpus={"cpu": 1}), pool("b", gpus={"l4": 1}, created_at=NOW - 50))
    workers = [worker("c1", "cpu"), worker("c2", "cpu"), worker("g1", "l4"), worker("g2", "l4")]
    first = run(snap(*pools, workers=workers, replicas={"cpu": 2, "l4": 1}))
    settled = tuple(
        p.model_copy(
            update={
                "state": first.states[p.name],
                "assigned_workers": [w for w, q in first.assignments.items() if q == p.name],
            }
        )
        for p in pools
    )
    second = run(
        snap(*settled, workers=workers, assignments=first.assignments, replicas=first.targets)
    )
    assert second.assignments == first.assignments
    assert second.targets == first.targets
    assert second.reasons == ()
    third = run(
        snap(
            *settled, workers=workers[::-1], assignments=second.assignments, replicas=second.targets
        )
    )
    assert third.assignments == first.assignments, "worker order does not matter"


def test_previous_assignment_survives_a_new_ready_worker() -> None:
    record = pool("a", gpus={"cpu": 1})
    workers = [worker("z", "cpu", loaded=False), worker("b", "cpu")]
    decision = run(snap(record, workers=workers, assignments={"z": "a"}, replicas={"cpu": 2}))
    assert decision.assignments["z"] == "a", "a loading worker is not swapped for a ready one"


# --- expiry -----------------------------------------------------------------------------------------


def test_expired_pool_releases_its_workers_and_target() -> None:
    record = pool("old", created_at=NOW - 100, lease_s=50, gpus={"l4": 1})
    record = record.model_copy(update={"state": "active", "assigned_workers": ["g1"]})
    decision = run(
        snap(
            record,
            workers=[worker("g1", "l4")],
            assignments={"g1": "old"},
            replicas={"l4": 1},
            shrink_since={"l4": NOW - 61},
        )
    )
    assert decision.states["old"] == "expired"
    assert decision.assignments["g1"] == "default"
    assert decision.targets["l4"] == 0
    assert any(
        r.kind == "pool_expired" and "pool 'old' expired" in r.text for r in decision.reasons
    )
    assert Reason("worker_assigned", "worker g1 (l4) -> default pool") in decision.reasons


def test_lease_boundary() -> None:
    record = pool("edge", created_at=NOW - 10, lease_s=10, gpus={"cpu": 1})
    assert run(snap(record), NOW - 0.001).states["edge"] != "expired"
    assert run(snap(record), NOW).states["edge"] == "expired"


def test_every_change_has_a_reason() -> None:
    decision = run(snap(pool("p", gpus={"l4": 1})))
    assert decision.targets["l4"] == 1
    assert decision.reasons and all(isinstance(r, Reason) and r.text for r in decision.reasons)


def test_cluster_fit_counts_one_cpu_engine_per_node_under_load() -> None:
    cpu, l4 = CONFIG.profiles[0], CONFIG.profiles[1]
    nodes = [{"CPU": 4.0}, {"CPU": 2.0, "GPU": 2.0}]
    assert workers_that_fit(cpu, nodes) == 6  # resources alone: 4 + 2 one-CPU workers
    assert workers_that_fit(cpu, nodes, gainful=True) == 2  # one CPU engine per node adds compute
    assert workers_that_fit(l4, nodes) == workers_that_fit(l4, nodes, gainful=True) == 2


def test_reasons_carry_the_kind_metrics_count() -> None:
    record = pool("p", gpus={"cpu": 1})
    decision = run(snap(record, workers=[worker("c1", "cpu")], replicas={"cpu": 1}))
    assert decision.reasons == (
        Reason("scale_up", "cpu: 1 -> 2 workers (default 1, p 1)"),
        Reason("worker_assigned", "worker c1 (cpu) -> pool 'p'"),
        Reason("pool_state", "pool 'p' active: requirement met"),
    )
    shared = pool("s", shared=True, queue_pool="p")
    assert Reason("pool_state", "pool 's' active: shares the workers of 'p'") in (
        run(snap(record, shared)).reasons
    )
