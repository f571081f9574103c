"""Rate and concurrency limits per subject (a pool, an API key id): requests and tokens per
sliding window (a minute unless configured) and concurrent streams. One `LimitBook` decides for
the whole service (the TenantLedger holds it), before any engine work.

Tokens are known when a request ends, so admission reserves an upper bound (`estimate_tokens`:
prompt bound + max tokens x n) for each request in flight and replaces it with the real count when it ends:
`used in the window + reserved + this request's estimate <= tokens_per_minute`. Pure: every
time is passed in."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from app.config import Limits
from app.errors import (
    ConcurrencyLimited,
    InvalidRequest,
    RateLimited,
    ServiceError,
    TokenRateLimited,
)

Subject = tuple[str, str]
"""('pool', name) or ('key', key id)."""
BUCKETS_PER_WINDOW = 60
EXPIRY_SCANS_PER_LEASE = 10


def describe(subject: Subject) -> str:
    kind, name = subject
    return f"pool '{name}'" if kind == "pool" else f"API key {name}"


@dataclass(frozen=True, slots=True)
class Ticket:
    """What admission needs to know about one request."""

    request_id: str
    subjects: tuple[tuple[Subject, Limits], ...]
    estimated_tokens: int


@dataclass(slots=True)
class SlidingWindow:
    """Requests and tokens per bucket (oldest first) over the sliding window, with running
    totals (a check costs the same whatever the bucket count)."""

    buckets: deque[list[float]] = field(default_factory=deque)  # [start, requests, tokens]
    requests: float = 0.0
    tokens: float = 0.0

    def trim(self, now: float, window_s: float, bucket_s: float) -> None:
        """Drop buckets wholly older than the window (a bucket counts until its end leaves:
        the limit never admits more than it allows over any window)."""
        buckets = self.buckets
        while buckets and buckets[0][0] + bucket_s <= now - window_s:
            _, requests, tokens = buckets.popleft()
            self.requests -= requests
            self.tokens -= tokens
        if not buckets:
            self.requests = self.tokens = 0.0  # no float drift survives an empty window

    def add(self, now: float, bucket_s: float, requests: float, tokens: float) -> None:
        start = math.floor(now / bucket_s) * bucket_s
        if not self.buckets or self.buckets[-1][0] != start:
            self.buckets.append([start, 0.0, 0.0])
        self.buckets[-1][1] += requests
        self.buckets[-1][2] += tokens
        self.requests += requests
        self.tokens += tokens

    def total(self, column: int) -> float:
        """1: requests, 2: tokens."""
        return self.requests if column == 1 else self.tokens

    def wait_until_below(
        self, column: int, excess: float, now: float, window_s: float, bucket_s: float
    ) -> float:
        """Seconds until buckets worth at least `excess` of `column` have left the window."""
        freed = 0.0
        for start, *values in self.buckets:
            freed += values[column - 1]
            if freed >= excess:
                return max(0.0, start + bucket_s + window_s - now)
        return window_s


@dataclass(slots=True)
class _Subject:
    window: SlidingWindow = field(default_factory=SlidingWindow)
    reserved: dict[str, int] = field(default_factory=dict)  # request id -> estimated tokens
    held: int = 0  # their sum


@dataclass(slots=True)
class _InFlight:
    subjects: tuple[Subject, ...]
    expires_at: float


class LimitBook:
    def __init__(self, window_s: float = 60.0, lease_s: float = 30.0) -> None:
        self.window_s = window_s
        self.bucket_s = window_s / BUCKETS_PER_WINDOW
        self.lease_s = lease_s
        self._subjects: dict[Subject, _Subject] = {}
        self._in_flight: dict[str, _InFlight] = {}
        self._expire_at = 0.0  # before this, no lease can have lapsed unseen by much

    def _state(self, subject: Subject, now: float) -> _Subject:
        state = self._subjects.setdefault(subject, _Subject())
        state.window.trim(now, self.window_s, self.bucket_s)
        return state

    def admit(self, ticket: Ticket, now: float) -> ServiceError | None:
        """None and the request counts against every subject's limits, or the refusal (429, or
        400 when one request alone exceeds a tokens-per-minute limit). Lapsed leases are looked
        for at most every `lease_s / EXPIRY_SCANS_PER_LEASE` (a scan is linear in the requests
        in flight; a dead ingress's streams are released that much later)."""
        if now >= self._expire_at:
            self.expire(now)
            self._expire_at = now + self.lease_s / EXPIRY_SCANS_PER_LEASE
        if ticket.request_id in self._in_flight:
            return None  # a retried admission of the same request
        for subject, limits in ticket.subjects:
            refusal = self._check(subject, limits, ticket.estimated_tokens, now)
            if refusal is not None:
                return refusal
        for subject, _ in ticket.subjects:
            state = self._state(subject, now)
            state.window.add(now, self.bucket_s, 1, 0)
            state.reserved[ticket.request_id] = ticket.estimated_tokens
            state.held += ticket.estimated_tokens
        self._in_flight[ticket.request_id] = _InFlight(
            tuple(subject for subject, _ in ticket.subjects), now + self.lease_s
        )
        return None

    def _check(
        self, subject: Subject, limits: Limits, estimate: int, now: float
    ) -> ServiceError | None:
        state = self._state(subject, now)
        window = state.window
        per = f"per {self.window_s:g} s" if self.window_s != 60 else "per minute"
        extra = {"limit_subject": subject[0], "limit_name": subject[1]}
        if (
            limits.concurrent_streams is not None
            and len(state.reserved) >= limits.concurrent_streams
        ):
            return ConcurrencyLimited(
                f"{describe(subject)} already has {len(state.reserved)} requests in flight "
                f"(concurrent_streams={limits.concurrent_streams})",
                retry_after_s=1.0,
                extra={**extra, "limit": "concurrent_streams"},
            )
        if limits.requests_per_minute is not None:
            used = window.total(1)
            if used + 1 > limits.requests_per_minute:
                wait = window.wait_until_below(
                    1, used + 1 - limits.requests_per_minute, now, self.window_s, self.bucket_s
                )
                return RateLimited(
                    f"{describe(subject)} made {int(used)} requests {per} "
                    f"(requests_per_minute={limits.requests_per_minute})",
                    retry_after_s=max(1.0, wait),
                    extra={**extra, "limit": "requests_per_minute"},
                )
        if limits.tokens_per_minute is not None:
            if estimate > limits.tokens_per_minute:
                return InvalidRequest(
                    f"this request may use {estimate} tokens (prompt + max tokens), more than "
                    f"the tokens_per_minute={limits.tokens_per_minute} of {describe(subject)}",
                    param="max_tokens",
                )
            reserved = state.held
            used = window.total(2)
            excess = used + reserved + estimate - limits.tokens_per_minute
            if excess > 0:
                wait = (
                    window.wait_until_below(2, excess, now, self.window_s, self.bucket_s)
                    if excess <= used
                    else 1.0  # the requests in flight hold the rest: wait for one to end
                )
                return TokenRateLimited(
                    f"{describe(subject)} used {int(used)} tokens {per} and holds {reserved} "
                    f"for requests in flight; this one may use {estimate} "
                    f"(tokens_per_minute={limits.tokens_per_minute})",
                    retry_after_s=max(1.0, wait),
                    extra={**extra, "limit": "tokens_per_minute"},
                )
        return None

    def finish(self, request_id: str, tokens: int | None, now: float) -> None:
        """The request ended: its reservation becomes its real token count (None: it produced
        nothing to count)."""
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        for subject in flight.subjects:
            state = self._state(subject, now)
            state.held -= state.reserved.pop(request_id, 0)
            if tokens:
                state.window.add(now, self.bucket_s, 0, tokens)

    def renew(self, request_ids: Iterable[str], now: float) -> None:
        """An ingress still relays these requests: keep their streams counted."""
        for request_id in request_ids:
            flight = self._in_flight.get(request_id)
            if flight is not None:
                flight.expires_at = now + self.lease_s

    def expire(self, now: float) -> list[str]:
        """Release requests whose ingress stopped renewing them (it died mid-request)."""
        gone = [rid for rid, flight in self._in_flight.items() if flight.expires_at <= now]
        for request_id in gone:
            self.finish(request_id, None, now)
        return gone

    def in_flight(self, subject: Subject) -> int:
        state = self._subjects.get(subject)
        return 0 if state is None else len(state.reserved)

    def used_tokens(self, subject: Subject, now: float) -> int:
        return int(self._state(subject, now).window.total(2))


def subjects_for(
    pool: str, pool_limits: Limits | None, key_id: str, key_limits: Limits | None
) -> tuple[tuple[Subject, Limits], ...]:
    """The subjects whose limits apply (those with any limit set)."""
    found: list[tuple[Subject, Limits]] = []
    for subject, limits in ((("pool", pool), pool_limits), (("key", key_id), key_limits)):
        if limits is not None and limits.any():
            found.append((subject, limits))
    return tuple(found)


TEMPLATE_TOKENS = 32
"""Tokens a chat template may add to one prompt beyond the text its request body carries: a
default system prompt, the generation prompt, BOS. SmolLM2's adds 30 to a one-message chat
(its default system prompt included; the body of such a chat has at least 55 bytes more than
its text, so the bound holds with room). A template's per-message wrappers (ChatML's 5 tokens)
are paid by each message's JSON structure, at least 29 bytes."""


def estimate_tokens(
    prompt_bytes: int,
    max_tokens: int | None,
    candidates: int,
    default: int | None,
    context_tokens: int,
    prompts: int = 1,
) -> int:
    """A request's tokens-per-window reservation before it is tokenized: an upper bound on what
    the engine will count for it (prompt + completion), so a limit is never exceeded by more
    than the requests' real counts allow.

    - Prompt: the UTF-8 bytes of the request body (they hold every text a template renders;
      JSON escapes only add bytes) + `TEMPLATE_TOKENS` per prompt. A byte-level BPE token is
      at least one byte, and nothing tighter is safe without the tokenizer: SmolLM2 spends 1.0
      token a byte on digits, 0.9 on hex, 0.7 on random letters, CJK and emoji, 0.2 on English
      prose (where this reserves ~4.6x the prompt's tokens). Tokenizing here would put the
      tokenizer in the ingress and tokenize every prompt twice.
    - Completion: `max_tokens` (else `default`, else the whole context: what vLLM lets a
      request without max_tokens generate) for each candidate of each prompt.
    - At most the context for each candidate of each prompt (a prompt and its reply fit the
      context, so a bloated prompt bound never reserves more than the request can use).

    Settled to the engine's real count when the request ends."""
    sequences = max(1, prompts) * max(1, candidates)
    budget = max_tokens or default or context_tokens
    estimate = prompt_bytes + max(1, prompts) * TEMPLATE_TOKENS + sequences * budget
    return min(estimate, sequences * context_tokens) if context_tokens > 0 else estimate


__all__: Sequence[str] = (
    "TEMPLATE_TOKENS",
    "LimitBook",
    "SlidingWindow",
    "Subject",
    "Ticket",
    "estimate_tokens",
    "subjects_for",
)
