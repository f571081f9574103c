"""The ingress's body byte bucket (app/web/pacing.py); reading through it: tests/unit/test_api.py."""

from __future__ import annotations

import pytest

from app.web.pacing import ByteBucket

MIB = 1024 * 1024


def test_a_full_bucket_reads_one_maximum_body_at_once() -> None:
    bucket = ByteBucket(rate=MIB, capacity=8 * MIB)
    assert bucket.take(8 * MIB, now=100.0) == 0.0


def test_a_flood_is_paced_at_the_rate() -> None:
    bucket = ByteBucket(rate=MIB, capacity=8 * MIB)
    bucket.take(8 * MIB, now=0.0)
    # the next 4 MiB right after: read at 1 MiB/s
    assert bucket.take(4 * MIB, now=0.0) == pytest.approx(4.0)
    # a concurrent reader queues behind that debt
    assert bucket.take(MIB, now=0.0) == pytest.approx(5.0)
    # after the debt is paid and 2 s more, 2 MiB are free again
    assert bucket.take(2 * MIB, now=7.0) == 0.0
    assert bucket.take(MIB, now=7.0) == pytest.approx(1.0)


def test_refill_stops_at_the_capacity() -> None:
    bucket = ByteBucket(rate=MIB, capacity=2 * MIB)
    bucket.take(MIB, now=0.0)
    assert bucket.take(2 * MIB, now=1000.0) == 0.0
    assert bucket.take(MIB, now=1000.0) == pytest.approx(1.0)


def test_rate_zero_never_waits() -> None:
    bucket = ByteBucket(rate=0, capacity=MIB)
    assert bucket.take(100 * MIB, now=0.0) == 0.0
