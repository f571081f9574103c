"""A closed loop of streaming chat clients that honour `Retry-After` (as the sie-sdk does), for
measuring what a change to a running service (redeploy, scale-down, node drain) costs them:
requests, failures, streams cut, and the longest wait a request had before its first token.

    loop = ClosedLoop(base_url, model, clients=8)
    async with loop.running():
        ...  # change the service
    print(loop.result.row())

Used by `benchmarks/changes.py` and `tests/e2e/test_changes_under_load.py`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import httpx

from app.history import percentile
from tests.support.sse import DONE, adata

MAX_RETRIES = 120  # one request's 429/503 retries before it counts as failed


@dataclass
class LoopResult:
    completed: int = 0
    """Requests answered with a whole stream (through to `[DONE]`, no in-band error)."""
    failed: int = 0
    """Requests that ended in anything but a whole stream: a non-retryable status, a
    connection error, or more than MAX_RETRIES refusals."""
    cut: int = 0
    """Streams that started (200) and ended without `[DONE]` or with an in-band error."""
    retried: int = 0
    """429/503 answers (with Retry-After) that the client waited out and retried."""
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    first_token_s: list[float] = field(default_factory=list)
    """Per completed request: from its first attempt to its first token (retries included)."""
    spans: list[tuple[float, float]] = field(default_factory=list)
    """Per completed request: (first attempt, end of stream), `time.monotonic()`."""

    def spanning(self, moment: float) -> int:
        """Completed requests that were under way at `moment` (monotonic)."""
        return sum(start < moment < end for start, end in self.spans)

    stopped: int = 0
    """Clients that got the `stop_on` status (e.g. 404 once their pool is deleted) and stopped:
    an answer the change makes right, not a loss."""

    def merge(self, other: LoopResult) -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.cut += other.cut
        self.retried += other.retried
        self.stopped += other.stopped
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.first_token_s.extend(other.first_token_s)
        self.spans.extend(other.spans)

    @property
    def requests(self) -> int:
        return self.completed + self.failed

    @property
    def longest_wait_s(self) -> float:
        return max(self.first_token_s, default=0.0)

    @property
    def median_wait_s(self) -> float:
        return percentile(self.first_token_s, 50) or 0.0

    def row(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "streams cut": self.cut,
            "retried 429/503": self.retried,
            "first token p50 (s)": round(self.median_wait_s, 2),
            "longest wait (s)": round(self.longest_wait_s, 2),
            "errors": dict(self.errors),
        }


class ClosedLoop:
    def __init__(
        self,
        base_url: str,
        model: str,
        clients: int = 8,
        max_tokens: int = 32,
        headers: Mapping[str, str] | None = None,
        extra_body: Mapping[str, object] | None = None,
        stop_on: int | None = None,
    ) -> None:
        self.base_url = base_url
        self.model = model
        self.clients = clients
        self.max_tokens = max_tokens
        self.headers = dict(headers or {})
        self.extra_body = dict(extra_body or {})
        self.stop_on = stop_on
        self.result = LoopResult()
        self._stop = asyncio.Event()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[LoopResult]:
        """The clients run while the body runs; on exit each finishes its current request."""
        limits = httpx.Limits(max_connections=self.clients + 4)
        timeout = httpx.Timeout(900.0, connect=30.0)
        async with httpx.AsyncClient(
            base_url=self.base_url, limits=limits, timeout=timeout, headers=self.headers
        ) as client:
            tasks = [asyncio.create_task(self._client(client, i)) for i in range(self.clients)]
            try:
                yield self.result
            finally:
                self._stop.set()
                await asyncio.gather(*tasks)

    async def _client(self, client: httpx.AsyncClient, index: int) -> None:
        while not self._stop.is_set():
            if not await self._one(client, index):
                return

    async def _one(self, client: httpx.AsyncClient, index: int) -> bool:
        """One request through to its end; False when the client should stop (`stop_on`)."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"Client {index}: tell me a story."}],
            "max_tokens": self.max_tokens,
            "stream": True,
            **self.extra_body,
        }
        started = time.monotonic()
        result = self.result
        for _ in range(MAX_RETRIES):
            try:
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    result.statuses[response.status_code] += 1
                    if response.status_code in (429, 503):
                        await response.aread()
                        retry_after = response.headers.get("retry-after")
                        if retry_after is None:
                            result.errors[f"{response.status_code} without Retry-After"] += 1
                            result.failed += 1
                            return True
                        result.retried += 1
                        await asyncio.sleep(float(retry_after))
                        continue
                    if response.status_code == self.stop_on:
                        await response.aread()
                        result.stopped += 1
                        return False
                    if response.status_code != 200:
                        text = (await response.aread()).decode(errors="replace")[:200]
                        result.errors[f"{response.status_code} {text}"] += 1
                        result.failed += 1
                        return True
                    try:
                        await self._read_stream(response, started)
                    except httpx.HTTPError as error:  # the connection broke mid-stream
                        result.errors[f"cut: {type(error).__name__}"] += 1
                        result.cut += 1
                        result.failed += 1
                    return True
            except httpx.HTTPError as error:
                result.errors[type(error).__name__] += 1
                result.failed += 1
                return True
        result.errors["too many retries"] += 1
        result.failed += 1
        return True

    async def _read_stream(self, response: httpx.Response, started: float) -> None:
        result = self.result
        first = None
        done = False
        error = None
        async for item in adata(response):
            if item == DONE:
                done = True
                break
            if first is None:
                first = time.monotonic() - started
            event = json.loads(item)
            if "error" in event:
                error = str(event["error"].get("code"))
        if done and error is None:
            result.completed += 1
            result.first_token_s.append(first if first is not None else 0.0)
            result.spans.append((started, time.monotonic()))
        else:
            result.cut += 1
            result.failed += 1
            result.errors[f"cut: {error or 'no [DONE]'}"] += 1
