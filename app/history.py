"""The dashboard's recent history: per step of `STEP_S` (the last `SPAN_S`), what finished and
what failed, as summaries that add up across ingress replicas (`merge_steps`), so the charts are
cluster-wide.

On the request path an ingress replica only appends to a bounded deque (`RecentWindow.samples`,
`.errors`); `RecentWindow.steps` folds what is pending into its steps when they are read (once a
second by the metrics publisher, or by the dashboard). A step holds counts, token totals and
latency sketches (log-bucketed histograms: a percentile from them is within 2 % of the exact
one), overall and per (pool, model). Not exported to Prometheus (`app.metrics` fills it as it
counts)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

STEP_S = 15.0
SPAN_S = 300.0
PENDING = 16_384
"""Finished generations (and errors) a replica holds between two folds: beyond it, the oldest
are dropped (a replica folds once a second while it shares its metrics)."""

Sketch = dict[int, int]
"""Log-bucketed counts of values in ms: bucket i holds (GAMMA**(i-1), GAMMA**i]."""
GAMMA = 1.04
_LOG_GAMMA = math.log(GAMMA)
_FLOOR_MS = 1e-3


def sketch_add(sketch: Sketch, value_ms: float) -> None:
    index = math.ceil(math.log(max(value_ms, _FLOOR_MS)) / _LOG_GAMMA)
    sketch[index] = sketch.get(index, 0) + 1


def sketch_merge(into: Sketch, other: Mapping[int, int]) -> None:
    for index, count in other.items():
        into[index] = into.get(index, 0) + count


def sketch_quantile(sketch: Mapping[int, int], q: float) -> float | None:
    """Nearest-rank percentile `q` (0-100) in ms, within (GAMMA - 1) / (GAMMA + 1) (2 %) of the
    exact one; None when the sketch is empty."""
    total = sum(sketch.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q / 100 * total))
    seen = 0
    for index in sorted(sketch):
        seen += sketch[index]
        if seen >= rank:
            return 2 * GAMMA**index / (GAMMA + 1)
    raise AssertionError("unreachable: rank <= total")


@dataclass(slots=True)
class Tally:
    """One step's numbers for one group of requests (all of them, or one pool and model)."""

    requests: int = 0  # finished generations
    tokens: int = 0
    errors: int = 0  # requests answered with an error code
    ttft: Sketch = field(default_factory=dict)
    tpot: Sketch = field(default_factory=dict)
    engine_ttft: Sketch = field(default_factory=dict)
    engine_tpot: Sketch = field(default_factory=dict)

    def add_sample(self, sample: Sample) -> None:
        self.requests += 1
        self.tokens += sample.tokens
        for sketch, value in (
            (self.ttft, sample.ttft_s),
            (self.tpot, sample.tpot_s),
            (self.engine_ttft, sample.engine_ttft_s),
            (self.engine_tpot, sample.engine_tpot_s),
        ):
            if value is not None:
                sketch_add(sketch, value * 1000)

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.tokens += other.tokens
        self.errors += other.errors
        sketch_merge(self.ttft, other.ttft)
        sketch_merge(self.tpot, other.tpot)
        sketch_merge(self.engine_ttft, other.engine_ttft)
        sketch_merge(self.engine_tpot, other.engine_tpot)


@dataclass(slots=True)
class Step:
    """One step of history: every request's tally, errors by code, tallies per (pool, model)."""

    total: Tally = field(default_factory=Tally)
    errors: dict[str, int] = field(default_factory=dict)
    targets: dict[tuple[str, str], Tally] = field(default_factory=dict)

    def target(self, pool: str, model: str) -> Tally:
        tally = self.targets.get((pool, model))
        if tally is None:
            tally = self.targets[(pool, model)] = Tally()
        return tally

    def merge(self, other: Step) -> None:
        self.total.merge(other.total)
        for code, count in other.errors.items():
            self.errors[code] = self.errors.get(code, 0) + count
        for (pool, model), tally in other.targets.items():
            self.target(pool, model).merge(tally)


Steps = dict[int, Step]
"""Steps by index: step k covers [k * STEP_S, (k + 1) * STEP_S) in unix seconds."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One finished generation, for the dashboard's recent percentiles and tokens/s."""

    at: float
    ttft_s: float | None
    tpot_s: float | None
    engine_ttft_s: float | None
    engine_tpot_s: float | None
    tokens: int
    pool: str = ""
    model: str = ""


class RecentWindow:
    """This replica's recent history: pending records (appended on the request path) and the
    steps they were folded into."""

    def __init__(self, size: int = PENDING, span_s: float = SPAN_S) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)
        self.errors: deque[tuple[float, str, str, str]] = deque(
            maxlen=size
        )  # at, code, pool, model
        self.span_s = span_s
        self._steps: Steps = {}

    def steps(self, now: float) -> Steps:
        """Fold what is pending, drop steps older than the span; the steps (not to be changed
        by the caller)."""
        steps = self._steps
        samples, errors = self.samples, self.errors
        while samples:
            sample = samples.popleft()
            step = _step_of(steps, sample.at)
            step.total.add_sample(sample)
            if sample.pool or sample.model:
                step.target(sample.pool, sample.model).add_sample(sample)
        while errors:
            at, code, pool, model = errors.popleft()
            step = _step_of(steps, at)
            step.total.errors += 1
            step.errors[code] = step.errors.get(code, 0) + 1
            if pool or model:
                step.target(pool, model).errors += 1
        oldest = first_step(now, self.span_s)
        for index in [index for index in steps if index < oldest]:
            del steps[index]
        return steps

    def series(self, now: float) -> dict[str, Any]:
        return series(self.steps(now), now)

    def summary(self, now: float) -> dict[str, Any]:
        return summary(self.steps(now), now)


def _step_of(steps: Steps, at: float) -> Step:
    index = int(at // STEP_S)
    step = steps.get(index)
    if step is None:
        step = steps[index] = Step()
    return step


def first_step(now: float, span_s: float = SPAN_S) -> int:
    """The oldest step index within `span_s` of `now` (the current step included)."""
    return int(now // STEP_S) - int(span_s // STEP_S) + 1


def merge_steps(many: Iterable[Mapping[int, Step]], now: float, span_s: float = SPAN_S) -> Steps:
    """Several replicas' steps added up (a new object; the inputs are left alone), without the
    steps older than the span."""
    oldest = first_step(now, span_s)
    merged: Steps = {}
    for steps in many:
        for index, step in steps.items():
            if index >= oldest:
                merged.setdefault(index, Step()).merge(step)
    return merged


def _window(steps: Mapping[int, Step], now: float, span_s: float) -> Tally:
    total = Tally()
    oldest = first_step(now, span_s)
    for index, step in steps.items():
        if index >= oldest:
            total.merge(step.total)
    return total


def _quantiles(tally: Tally, names: Sequence[str]) -> dict[str, float | None]:
    return {
        f"{name}_p{q}_ms": sketch_quantile(getattr(tally, name), q)
        for name in names
        for q in (50, 99)
    }


def series(steps: Mapping[int, Step], now: float, span_s: float = SPAN_S) -> dict[str, Any]:
    """Per step over the last `span_s`: p50/p99 of TTFT/TPOT (ms), requests and tokens/s (the
    current step's over its elapsed part)."""
    rows = []
    current = int(now // STEP_S)
    for index in range(first_step(now, span_s), current + 1):
        step = steps.get(index)
        tally = step.total if step is not None else Tally()
        elapsed = STEP_S if index < current else max(1.0, now - index * STEP_S)
        rows.append(
            {
                "at": (index + 1) * STEP_S,
                "requests": tally.requests,
                **_quantiles(tally, ("ttft", "tpot")),
                "tokens_per_s": tally.tokens / elapsed,
            }
        )
    return {"step_s": STEP_S, "points": rows}


def summary(steps: Mapping[int, Step], now: float, span_s: float = SPAN_S) -> dict[str, Any]:
    """The whole span: requests, tokens, p50/p99 of TTFT/TPOT as the ingress and the engine saw
    them (ms)."""
    tally = _window(steps, now, span_s)
    return {
        "span_s": span_s,
        "requests": tally.requests,
        "tokens": tally.tokens,
        **_quantiles(tally, ("ttft", "tpot", "engine_ttft", "engine_tpot")),
    }


def recent_errors(steps: Mapping[int, Step], now: float, span_s: float = SPAN_S) -> dict[str, int]:
    """Errors by code over the span."""
    counts: dict[str, int] = {}
    oldest = first_step(now, span_s)
    for index, step in steps.items():
        if index >= oldest:
            for code, count in step.errors.items():
                counts[code] = counts.get(code, 0) + count
    return dict(sorted(counts.items()))


def by_target(
    steps: Mapping[int, Step], now: float, span_s: float = SPAN_S
) -> list[dict[str, Any]]:
    """Per (pool, model) over the span: requests, errors, tokens, p50/p99 of TTFT and TPOT (ms)."""
    tallies: dict[tuple[str, str], Tally] = {}
    oldest = first_step(now, span_s)
    for index, step in steps.items():
        if index >= oldest:
            for key, tally in step.targets.items():
                tallies.setdefault(key, Tally()).merge(tally)
    return [
        {
            "pool": pool,
            "model": model,
            "requests": tally.requests,
            "errors": tally.errors,
            "tokens": tally.tokens,
            **_quantiles(tally, ("ttft", "tpot")),
        }
        for (pool, model), tally in sorted(tallies.items())
    ]


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank: the smallest of `values` with at least q % of
    them at or below it. Always one of the values, never an interpolation: p50 of [1, 2, 3, 4]
    is 2, p99 of 1..100 is 99, p100 the largest. None when there are no values. The project's
    one percentile (benchmarks and tests use this one; `sketch_quantile` is the same definition
    on a sketch)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


RECENT = RecentWindow()
