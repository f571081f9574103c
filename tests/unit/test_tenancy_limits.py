"""Limits (app/tenancy/limits.py): requests and tokens per sliding window, concurrent streams,
Retry-After from the window, reservations reconciled with real counts, leases of requests whose
ingress died, and the refusals' codes."""

from __future__ import annotations

import pytest

from app.config import AppConfig, Limits
from app.errors import ConcurrencyLimited, InvalidRequest, RateLimited, TokenRateLimited
from app.tenancy.limits import (
    TEMPLATE_TOKENS,
    LimitBook,
    Ticket,
    estimate_tokens,
    subjects_for,
)

T0 = 1000.0


def ticket(rid: str, limits: Limits, tokens: int = 10, subject: str = "a") -> Ticket:
    return Ticket(rid, ((("pool", subject), limits),), tokens)


def test_requests_per_minute_refuses_with_retry_after_until_the_oldest_leaves() -> None:
    book = LimitBook(window_s=60)
    limits = Limits(requests_per_minute=3)
    for n in range(3):
        assert book.admit(ticket(f"r{n}", limits), T0 + n * 10) is None
        book.finish(f"r{n}", 5, T0 + n * 10 + 1)
    refusal = book.admit(ticket("r3", limits), T0 + 30)
    assert isinstance(refusal, RateLimited) and refusal.status == 429
    assert refusal.code == "rate_limit_exceeded"
    assert refusal.retry_after_s == pytest.approx(30, abs=1.01)  # r0 leaves at T0 + 60
    assert refusal.extra["limit"] == "requests_per_minute"
    assert book.admit(ticket("r3", limits), T0 + 61) is None


def test_tokens_per_minute_counts_reservations_then_real_tokens() -> None:
    book = LimitBook(window_s=60)
    limits = Limits(tokens_per_minute=100)
    assert book.admit(ticket("a", limits, tokens=60), T0) is None
    refusal = book.admit(ticket("b", limits, tokens=60), T0 + 1)  # 60 reserved + 60 > 100
    assert isinstance(refusal, TokenRateLimited) and refusal.code == "token_rate_limit_exceeded"
    assert refusal.retry_after_s == 1.0  # held by a request in flight
    book.finish("a", 20, T0 + 2)  # it used only 20
    assert book.admit(ticket("b", limits, tokens=60), T0 + 3) is None
    book.finish("b", 70, T0 + 4)
    refusal = book.admit(ticket("c", limits, tokens=30), T0 + 5)  # 90 used + 30 > 100
    assert isinstance(refusal, TokenRateLimited)
    # the 20 tokens' bucket [T0 + 2, T0 + 3) leaves the window at T0 + 63: 70 + 30 fits then
    assert refusal.retry_after_s == pytest.approx(58, abs=0.01)
    assert isinstance(book.admit(ticket("c", limits, tokens=30), T0 + 62.9), TokenRateLimited)
    assert book.admit(ticket("c", limits, tokens=30), T0 + 63.0) is None


def test_a_request_over_the_whole_token_limit_is_a_400() -> None:
    refusal = LimitBook().admit(ticket("big", Limits(tokens_per_minute=50), tokens=51), T0)
    assert isinstance(refusal, InvalidRequest) and refusal.status == 400
    assert refusal.param == "max_tokens"


def test_concurrent_streams_and_leases_of_a_dead_ingress() -> None:
    book = LimitBook(lease_s=30)
    limits = Limits(concurrent_streams=2)
    assert book.admit(ticket("a", limits), T0) is None
    assert book.admit(ticket("b", limits), T0) is None
    refusal = book.admit(ticket("c", limits), T0 + 1)
    assert isinstance(refusal, ConcurrencyLimited) and refusal.code == "concurrency_limit_exceeded"
    book.renew(["a"], T0 + 20)  # b's ingress died: nobody renews it
    assert book.admit(ticket("c", limits), T0 + 31) is None
    assert book.in_flight(("pool", "a")) == 2
    book.finish("a", 1, T0 + 32)
    book.finish("a", 1, T0 + 33)  # a second report changes nothing
    assert book.in_flight(("pool", "a")) == 1


def test_every_subject_must_admit_and_a_refusal_counts_nowhere() -> None:
    book = LimitBook()
    both = (
        (("pool", "p"), Limits(requests_per_minute=10)),
        (("key", "k"), Limits(requests_per_minute=1)),
    )
    assert book.admit(Ticket("r1", both, 1), T0) is None
    assert isinstance(book.admit(Ticket("r2", both, 1), T0), RateLimited)
    assert book.in_flight(("pool", "p")) == 1  # r2 took nothing


def test_subjects_only_where_limits_are_set_and_the_estimate() -> None:
    assert subjects_for("p", Limits(), "k", None) == ()
    assert subjects_for("p", None, "k", Limits(concurrent_streams=1)) == (
        (("key", "k"), Limits(concurrent_streams=1)),
    )


def test_the_estimate_bounds_prompt_and_completion_and_caps_at_the_context() -> None:
    # body bytes + the template's allowance + max tokens for each candidate
    assert estimate_tokens(400, 100, 2, None, 2048) == 400 + TEMPLATE_TOKENS + 200
    # without max tokens: the operator's default, else the whole context per candidate
    assert estimate_tokens(0, None, 1, 256, 2048) == TEMPLATE_TOKENS + 256
    assert estimate_tokens(100, None, 1, None, 2048) == 2048
    assert estimate_tokens(100, None, 3, None, 2048) == 3 * 2048
    # a batch of prompts: an allowance and a budget each
    assert estimate_tokens(300, 10, 2, None, 2048, prompts=3) == 300 + 3 * TEMPLATE_TOKENS + 60
    # a prompt and its reply fit the context: never more than the context per sequence
    assert estimate_tokens(50_000, 100, 1, None, 2048) == 2048
    assert estimate_tokens(50_000, 100, 2, None, 2048, prompts=2) == 4 * 2048
    assert estimate_tokens(50_000, 100, 1, None, 0) == 50_000 + TEMPLATE_TOKENS + 100


def test_key_limits_config_takes_ids_not_keys() -> None:
    config = AppConfig.model_validate(
        {"tenancy": {"key_limits": {"key-0123456789ab": {"requests_per_minute": 5}}}}
    )
    assert config.tenancy.limits_for_key("key-0123456789ab").requests_per_minute == 5
    assert config.tenancy.limits_for_key("key-ffffffffffff") == Limits()
    with pytest.raises(ValueError, match="not a key id"):
        AppConfig.model_validate({"tenancy": {"key_limits": {"sk-secret": {}}}})
