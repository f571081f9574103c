"""What the HTTP layer needs from the rest of the system, as a protocol: the Ray glue implements
it with deployment handles (`app/deployments/ingress.py`), tests with a fake engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from app.protocol.generation import GenerationChunk, GenerationRequest
from app.protocol.workers import WorkerStatus


class GenerationBackend(Protocol):
    def stream(self, request: GenerationRequest) -> AsyncIterator[list[GenerationChunk]]:
        """Batches of chunks for one request; raises ServiceError before or during the stream.
        Closing the iterator cancels the request on its worker."""
        ...

    async def workers(self) -> list[WorkerStatus]:
        """The latest status of every known worker (live or stale)."""
        ...
