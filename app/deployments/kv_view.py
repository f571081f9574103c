"""An ingress replica's catch-up on the workers' KV key sets (`routing.kv_events`): when an
acknowledgement shows this replica missed changes (it restarted, or saw no call to that worker
for a while), fetch the worker's whole set once (`Generator.kv_keys`), at most once a second
per worker and model."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray.serve.handle import DeploymentHandle

from app.routing.board import RoutingBoard
from app.routing.kv_keys import ReportedKeys

logger = logging.getLogger("ray.serve")
FETCH_INTERVAL_S = 1.0
FETCH_TIMEOUT_S = 5.0


class KeyFetcher:
    def __init__(self, board: RoutingBoard, generators: dict[str, DeploymentHandle[Any]]) -> None:
        self._board = board
        self._generators = generators
        self._last: dict[tuple[str, str], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.fetched = 0

    def poll(self, profile: str) -> None:
        """Fetch what the board wants (called as stats arrive; cheap when nothing is)."""
        if not self._board.wanted:
            return
        now = time.monotonic()
        for slot in list(self._board.wanted):
            if now - self._last.get(slot, float("-inf")) < FETCH_INTERVAL_S:
                continue
            self._board.wanted.discard(slot)
            self._last[slot] = now
            task = asyncio.get_running_loop().create_task(self._fetch(profile, *slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fetch(self, profile: str, worker: str, model: str) -> None:
        handle = self._generators.get(profile)
        if handle is None:
            return
        try:
            summary = await asyncio.wait_for(
                handle.kv_keys.remote(model, worker=worker), FETCH_TIMEOUT_S
            )
        except Exception:
            logger.warning("fetching the KV keys of worker %s failed", worker, exc_info=True)
            return
        index = self._board.index
        if isinstance(summary, list) and isinstance(index, ReportedKeys):
            index.apply(worker, model, summary)
            self.fetched += 1
