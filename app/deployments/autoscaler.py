"""PoolAutoscaler deployment (single replica). In this slice it is the registry of workers:
every Generator replica reports its status here; the ingress reads snapshots."""

from __future__ import annotations

import time
from typing import Any

from app.config import AppConfig
from app.protocol.workers import WorkerStatus

FORGET_AFTER_SECONDS = 120.0


class PoolAutoscaler:
    def __init__(self, config: dict[str, Any]) -> None:
        self._config = AppConfig.model_validate(config)
        self._workers: dict[str, WorkerStatus] = {}

    def report(self, status: WorkerStatus) -> None:
        self._workers[status.worker_id] = status

    def forget(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)

    def workers(self) -> list[WorkerStatus]:
        cutoff = time.time() - FORGET_AFTER_SECONDS
        for worker_id in [w for w, s in self._workers.items() if s.reported_at < cutoff]:
            del self._workers[worker_id]
        return list(self._workers.values())
