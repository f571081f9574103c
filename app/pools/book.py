"""PoolBook: every pool, the current assignments and replica targets, as one serializable
value. The autoscaler is its only writer and persists `dumps()` after every change."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.errors import PoolNotFound
from app.pools.decide import Decision
from app.pools.model import PoolRecord, PoolSpec, normalize_name


class PoolBook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pools: dict[str, PoolRecord] = Field(default_factory=dict)
    assignments: dict[str, str] = Field(
        default_factory=dict, description="worker id -> pool name (absent: default)"
    )
    replicas: dict[str, int] = Field(
        default_factory=dict, description="profile -> the replica target last applied"
    )

    def upsert(self, spec: PoolSpec, now: float, lease_seconds: float) -> PoolRecord:
        """Create, or update and renew. An expired pool comes back as pending."""
        existing = self.pools.get(spec.name)
        if existing is None:
            record = PoolRecord(
                spec=spec, created_at=now, last_renewed=now, lease_seconds=lease_seconds
            )
        else:
            record = existing.model_copy(
                update={
                    "spec": spec,
                    "last_renewed": now,
                    "lease_seconds": lease_seconds,
                    "state": "pending" if existing.state == "expired" else existing.state,
                }
            )
        self.pools[spec.name] = record
        return record

    def renew(self, name: str, now: float) -> PoolRecord:
        record = self.get(name)
        if record is None:
            raise PoolNotFound(name)
        state = "pending" if record.state == "expired" else record.state
        renewed = record.model_copy(update={"last_renewed": now, "state": state})
        self.pools[renewed.name] = renewed
        return renewed

    def delete(self, name: str) -> bool:
        record = self.pools.pop(normalize_name(name), None)
        if record is None:
            return False
        self.assignments = {w: p for w, p in self.assignments.items() if p != record.name}
        return True

    def get(self, name: str) -> PoolRecord | None:
        return self.pools.get(normalize_name(name))

    def apply(self, decision: Decision) -> bool:
        """Take a decision's states, assignments and targets; True if anything changed (the
        fields it sets are compared, not the whole book's JSON: a round at 10,000 pools)."""
        assignments = dict(decision.assignments)
        replicas = {**self.replicas, **decision.targets}
        changed = assignments != self.assignments or replicas != self.replicas
        self.assignments, self.replicas = assignments, replicas
        by_pool: dict[str, list[str]] = {}
        for worker, pool in decision.assignments.items():
            by_pool.setdefault(pool, []).append(worker)
        for name, record in list(self.pools.items()):
            workers = sorted(by_pool.get(name, ()))
            state = decision.states.get(name, record.state)
            if state != record.state or workers != record.assigned_workers:
                self.pools[name] = record.model_copy(
                    update={"state": state, "assigned_workers": workers}
                )
                changed = True
        return changed
