"""The dashboard's recent history, kept in process by each ingress replica: the last finished
generations (for its percentiles and tokens/s) and the last error codes. Bounded; not exported
to Prometheus (`app.metrics` fills it as it counts)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Sample:
    """One finished generation, for the dashboard's recent percentiles and tokens/s."""

    at: float
    ttft_s: float | None
    tpot_s: float | None
    engine_ttft_s: float | None
    engine_tpot_s: float | None
    tokens: int


class RecentWindow:
    """The last finished generations and error codes (bounded), for the dashboard."""

    def __init__(self, size: int = 4096) -> None:
        self.samples: deque[Sample] = deque(maxlen=size)
        self.errors: deque[tuple[float, str]] = deque(maxlen=size)

    def series(self, now: float, span_s: float = 300.0, step_s: float = 15.0) -> dict[str, Any]:
        """Per `step_s` bucket over the last `span_s`: p50/p99 of TTFT/TPOT (ms) and tokens/s."""
        buckets = int(span_s // step_s)
        start = now - buckets * step_s
        grouped: list[list[Sample]] = [[] for _ in range(buckets)]
        for sample in self.samples:
            if sample.at >= start:
                grouped[min(buckets - 1, int((sample.at - start) // step_s))].append(sample)
        rows = []
        for index, group in enumerate(grouped):
            ttft = [s.ttft_s * 1000 for s in group if s.ttft_s is not None]
            tpot = [s.tpot_s * 1000 for s in group if s.tpot_s is not None]
            rows.append(
                {
                    "at": start + (index + 1) * step_s,
                    "requests": len(group),
                    "ttft_p50_ms": percentile(ttft, 50),
                    "ttft_p99_ms": percentile(ttft, 99),
                    "tpot_p50_ms": percentile(tpot, 50),
                    "tpot_p99_ms": percentile(tpot, 99),
                    "tokens_per_s": sum(s.tokens for s in group) / step_s,
                }
            )
        return {"step_s": step_s, "points": rows}

    def summary(self, now: float, span_s: float = 300.0) -> dict[str, Any]:
        recent = [s for s in self.samples if s.at >= now - span_s]

        def pick(attr: str) -> list[float]:
            return [getattr(s, attr) * 1000 for s in recent if getattr(s, attr) is not None]

        return {
            "span_s": span_s,
            "requests": len(recent),
            "tokens": sum(s.tokens for s in recent),
            **{
                f"{name}_p{q}_ms": percentile(pick(attr), q)
                for name, attr in (
                    ("ttft", "ttft_s"),
                    ("tpot", "tpot_s"),
                    ("engine_ttft", "engine_ttft_s"),
                    ("engine_tpot", "engine_tpot_s"),
                )
                for q in (50, 99)
            },
        }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) by nearest rank: the smallest of `values` with at least q % of
    them at or below it. Always one of the values, never an interpolation: p50 of [1, 2, 3, 4]
    is 2, p99 of 1..100 is 99, p100 the largest. None when there are no values. The project's
    one percentile: the dashboard, the benchmarks and the tests all use this one."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


RECENT = RecentWindow()
