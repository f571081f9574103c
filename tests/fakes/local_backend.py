"""GenerationBackend without Ray: one in-process Worker per profile, for API-layer tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from app.config import AppConfig
from app.engine.worker import Worker
from app.protocol.generation import GenerationChunk, GenerationRequest
from app.protocol.workers import WorkerStatus
from app.routing.targets import choose_target


class LocalBackend:
    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self.workers_by_profile = {p.name: Worker(config, p.name) for p in config.profiles}

    async def start(self) -> None:
        for worker in self.workers_by_profile.values():
            await worker.load_all()

    async def workers(self) -> list[WorkerStatus]:
        return [
            worker.status(f"local-{name}", "local-node")
            for name, worker in self.workers_by_profile.items()
        ]

    async def stream(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        target = choose_target(self.config, await self.workers(), request, time.time())
        batches = self.workers_by_profile[target.profile].stream(request)
        try:
            async for batch in batches:
                yield batch
        finally:
            await batches.aclose()
