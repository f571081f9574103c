"""Calling a Generator replica directly, as the ingress does (`Generator.generate` takes a
group of requests and answers them on one stream: `app/deployments/calls.py`), for one request."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from app.errors import ServiceError
from app.protocol.generation import GenerationRequest


class WorkerStream:
    """One request's items from a Generator: its batches, then a refusal if it was refused.
    `cancel()` cancels the call (and so the request)."""

    def __init__(self, handle: Any, request: GenerationRequest, worker: str | None = None):
        self._response = handle.options(stream=True).generate.remote([request], worker=worker)
        self._request_id = request.request_id

    def __iter__(self) -> Iterator[Any]:
        for _stats, items in self._response:
            for request_id, item in items:
                if request_id != self._request_id:
                    continue
                if item is None:
                    return
                yield item
                if isinstance(item, ServiceError):
                    return

    def cancel(self) -> None:
        self._response.cancel()


def worker_items(handle: Any, request: GenerationRequest, worker: str | None = None) -> list[Any]:
    """Every item the Generator sends for `request`."""
    return list(WorkerStream(handle, request, worker))
