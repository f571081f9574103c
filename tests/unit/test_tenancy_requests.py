"""Tenancy of one request and of a pool spec: pool defaults (priority, weight, vLLM's header),
limit tickets, usage records from terminal replies, shared pools in the spec, the decision and
routing, `since` parsing and the `poolserve_usage_*` exposition."""

from __future__ import annotations

import json
from typing import Any

import pytest

from app import metrics
from app.api.convert import request_priority
from app.api.usage import parse_since
from app.config import AppConfig, Limits
from app.engine.worker import flow_of
from app.errors import InvalidRequest
from app.pools.decide import Snapshot, WorkerView, decide
from app.pools.model import PoolRecord, PoolRequest, spec_from_request, spec_tenancy
from app.protocol.generation import (
    EngineCounts,
    GenerationChunk,
    GenerationRequest,
    OpenAICall,
    SamplingOptions,
    WireReply,
)
from app.protocol.workers import ModelStatus, WorkerStatus
from app.routing.targets import choose_target
from app.tenancy.fairshare import Flow
from app.tenancy.limits import TEMPLATE_TOKENS
from app.tenancy.requests import (
    ahead_of_bill,
    engine_usage,
    terminal_stats,
    ticket_for,
    with_pool_defaults,
)
from app.tenancy.usage import UsageBook, UsageRecord

NOW = 1000.0
CONFIG = AppConfig.model_validate(
    {
        "models": [{"id": "org/m"}],
        "profiles": [{"name": "cpu"}],
        "tenancy": {"key_limits": {"key-0123456789ab": {"concurrent_streams": 2}}},
    }
)


def pool(name: str = "team", **body: Any) -> PoolRecord:
    spec = spec_from_request(PoolRequest.model_validate({"name": name, **body}), CONFIG)
    return PoolRecord(spec=spec, created_at=NOW, last_renewed=NOW, lease_seconds=600)


def generation(**fields: Any) -> GenerationRequest:
    base: dict[str, Any] = {
        "request_id": "r1",
        "model": "org/m",
        "sampling": SamplingOptions(max_new_tokens=10, n=2),
        "prompt": "x" * 40,
        "pool": "Team",
    }
    return GenerationRequest(**(base | fields))


def test_pool_defaults_fill_priority_and_weight_and_tell_vllm() -> None:
    record = pool(gpus={"cpu": 3}, priority=-2, shared=True)
    call = OpenAICall("chat", {"model": "org/m"}, (("x-vllm-priority", "9"),))
    filled = with_pool_defaults(generation(openai=call), record)
    assert filled.priority == -2 and filled.share_weight == 3.0
    assert filled.openai is not None and filled.openai.headers == (("x-vllm-priority", "-2"),)
    own = with_pool_defaults(generation(priority=4), record)
    assert own.priority == 4
    assert with_pool_defaults(generation(pool=None), None).priority == 0
    assert filled.share_member == ""  # the pool shares as one


def test_a_pool_that_shares_by_key_names_each_key_its_member() -> None:
    record = pool(shared=True, share_by_key=True)
    assert record.spec.share_by_key and spec_tenancy(record.spec)["share_by_key"] is True
    assert spec_tenancy(pool().spec)["share_by_key"] is False
    keyed = with_pool_defaults(generation(key_id="key-0123456789ab"), record)
    assert keyed.share_member == "key-0123456789ab"
    assert with_pool_defaults(generation(), record).share_member == "none"  # no API keys
    assert flow_of(keyed) == Flow("team", 0, 1.0, "key-0123456789ab")


def test_tickets_carry_the_limits_that_apply_and_an_estimate() -> None:
    record = pool(tokens_per_minute=1000, requests_per_minute=5)
    ticket = ticket_for(generation(key_id="key-0123456789ab"), CONFIG, record)
    assert ticket.subjects == (
        (("pool", "team"), Limits(requests_per_minute=5, tokens_per_minute=1000)),
        (("key", "key-0123456789ab"), Limits(concurrent_streams=2)),
    )
    assert ticket.estimated_tokens == 40 + TEMPLATE_TOKENS + 2 * 10  # prompt bytes + template
    assert ticket_for(generation(key_id="key-ffffffffffff"), CONFIG, None).subjects == ()
    tokenize = generation(openai=OpenAICall("tokenize", {}), key_id="key-0123456789ab")
    assert ticket_for(tokenize, CONFIG, record).subjects == ()


def test_the_token_reservation_reads_the_body_size_the_batch_and_the_context() -> None:
    record = pool(tokens_per_minute=100_000)
    chat = {"model": "org/m", "messages": [{"role": "user", "content": "hé 🙂"}]}
    call = OpenAICall("chat", chat, (), 300)
    sampling = SamplingOptions(max_new_tokens=7)
    ticket = ticket_for(generation(openai=call, sampling=sampling), CONFIG, record)
    assert ticket.estimated_tokens == 300 + TEMPLATE_TOKENS + 7  # the body as received
    unsized = generation(openai=OpenAICall("chat", chat), sampling=sampling)
    assert ticket_for(unsized, CONFIG, record).estimated_tokens == (
        len(json.dumps(chat)) + TEMPLATE_TOKENS + 7  # (ASCII escapes: >= its UTF-8 bytes)
    )
    batch = OpenAICall("completion", {"prompt": ["a", "b", "c"]}, (), 60)
    ticket = ticket_for(generation(openai=batch, sampling=sampling), CONFIG, record)
    assert ticket.estimated_tokens == 60 + 3 * (TEMPLATE_TOKENS + 7)
    ids = OpenAICall("completion", {"prompt": [1, 2, 3]}, (), 60)
    ticket = ticket_for(generation(openai=ids, sampling=sampling), CONFIG, record)
    assert ticket.estimated_tokens == 60 + TEMPLATE_TOKENS + 7  # token ids: one prompt
    native = generation(prompt="日本", sampling=sampling)  # UTF-8: 6 bytes
    assert ticket_for(native, CONFIG, record).estimated_tokens == 6 + TEMPLATE_TOKENS + 7
    # no max tokens: the whole context (org/m's 2048) for each candidate
    endless = generation(sampling=SamplingOptions(n=2))
    assert ticket_for(endless, CONFIG, record).estimated_tokens == 2 * 2048
    bet = CONFIG.model_copy(
        update={"tenancy": CONFIG.tenancy.model_copy(update={"default_completion_tokens": 50})}
    )
    assert ticket_for(endless, bet, record).estimated_tokens == 40 + TEMPLATE_TOKENS + 2 * 50


def test_a_request_is_billed_what_the_engine_did_however_it_ends() -> None:
    terminal = GenerationChunk(
        "", done=True, finish_reason="length", prompt_tokens=7, completion_tokens=10
    )
    batch = [WireReply(b"data: x\n\n", stream=True), WireReply(b"", True, True, terminal)]
    assert terminal_stats(batch) == terminal
    assert terminal_stats([GenerationChunk("a")]) is None
    request = generation(key_id=None)
    counts = EngineCounts()
    assert engine_usage(request, counts) is None  # never reached the engine: nothing billed
    counts.output(7, 4, 1, first=True)  # prefilled (4 of 7 cached), first token
    counts.output(7, 4, 2, first=False)
    assert engine_usage(request, counts) == UsageRecord("r1", "team", "org/m", "none", 7, 4, 3)
    counts.output(5, 0, 1, first=True)  # a second engine request (a completion list)
    assert engine_usage(request, counts) == UsageRecord("r1", "team", "org/m", "none", 12, 4, 4)
    tokenize = generation(openai=OpenAICall("tokenize", {}))
    assert engine_usage(tokenize, counts) is None


def test_spec_fields_and_their_errors() -> None:
    record = pool(tokens_per_minute=10, concurrent_streams=2, priority=3, shared=True)
    assert record.spec.limits == Limits(tokens_per_minute=10, concurrent_streams=2)
    assert record.spec.priority == 3 and record.spec.worker_pool == "default"
    assert pool().spec.worker_pool == "team" and pool().spec.weight == 1.0
    with pytest.raises(InvalidRequest) as raised:
        pool(shared=True, gpu_caps={"cpu": 1})
    assert raised.value.param == "shared"
    with pytest.raises(InvalidRequest) as raised:
        pool(shared=True, queue_pool="team")
    assert raised.value.param == "queue_pool"


def worker(worker_id: str, assigned: str = "default") -> WorkerStatus:
    return WorkerStatus(
        worker_id=worker_id,
        deployment="Generator-cpu",
        profile="cpu",
        node_id="n",
        pool=assigned,
        models=(ModelStatus("org/m", "loaded"),),
        active_requests=0,
        reported_at=NOW,
    )


def test_a_shared_pool_holds_no_worker_and_routes_to_the_default_workers() -> None:
    shared = pool("tenant", gpus={"cpu": 1}, shared=True)
    snapshot = Snapshot(
        pools={"tenant": shared}, workers=[WorkerView.of(worker("w1"))], replicas={"cpu": 1}
    )
    decision = decide(snapshot, CONFIG, NOW)
    assert decision.states["tenant"] == "active"
    assert decision.assignments == {"w1": "default"} and decision.targets == {"cpu": 1}
    target = choose_target(
        CONFIG, [worker("w1")], generation(pool="tenant"), NOW, {"tenant": shared}
    )
    assert target.ready_workers == ("w1",)
    dedicated = pool("own", gpus={"cpu": 1})
    target = choose_target(
        CONFIG, [worker("w1"), worker("w2", "own")], generation(pool="own"), NOW, {"own": dedicated}
    )
    assert target.ready_workers == ("w2",)


def test_priority_inputs() -> None:
    assert request_priority({}, None) is None
    assert request_priority({}, -3) == -3
    assert request_priority({"x-vllm-priority": " 7 "}, -3) == 7  # vLLM's header wins
    for headers, body, param in (
        ({}, "high", "priority"),
        ({}, True, "priority"),
        ({}, 2**31, "priority"),
        ({"x-vllm-priority": "soon"}, None, "X-Vllm-Priority"),
    ):
        with pytest.raises(InvalidRequest) as raised:
            request_priority(headers, body)
        assert raised.value.param == param


def test_since_accepts_unix_seconds_and_rfc3339() -> None:
    assert parse_since(None) is None and parse_since("") is None
    assert parse_since("1800000000") == 1800000000.0
    assert parse_since("2027-01-15T08:00:00Z") == 1800000000.0
    assert parse_since("2027-01-15T09:00:00+01:00") == 1800000000.0
    for bad in ("soon", "-1", "nan", "2027-01-15T08:00:00"):
        with pytest.raises(InvalidRequest):
            parse_since(bad)


def test_usage_metrics_are_the_ledger_totals_with_bounded_labels() -> None:
    book = UsageBook()
    book.record(UsageRecord("r", "team", "org/m", "key-0123456789ab", 5, 1, 3), NOW)
    book.accrue({"team": 2}, NOW)
    book.accrue({"team": 2}, NOW + 5)
    metrics.USAGE.update(book.report())
    text = metrics.render().decode()
    labels = 'key_id="key-0123456789ab",model="org/m",pool="team"'
    assert f"poolserve_usage_requests_total{{{labels}}} 1.0" in text
    assert f"poolserve_usage_cached_prompt_tokens_total{{{labels}}} 1.0" in text
    assert f"poolserve_usage_completion_tokens_total{{{labels}}} 3.0" in text
    assert 'poolserve_usage_worker_seconds_total{pool="team"} 10.0' in text
    assert "poolserve_usage_prompt_tokens_total" in metrics.metric_names()


# ahead_of_bill: what of a terminal batch goes out before the worker bills the request


def sse(payload: str) -> bytes:
    return b"data: " + payload.encode() + b"\n\n"


STATS = GenerationChunk("", done=True, prompt_tokens=5, completion_tokens=1)
DONE = b"data: [DONE]\n\n"


def test_a_streamed_terminal_sends_its_tokens_ahead_and_holds_the_usage_event_and_done() -> None:
    token = sse('{"choices":[{"delta":{"content":"hi"},"finish_reason":"length"}]}')
    usage = sse('{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1}}')
    reply = WireReply(token + usage + DONE, stream=True, done=True, stats=STATS)
    ahead, rest = ahead_of_bill([reply])
    assert ahead == [WireReply(token, stream=True)]
    assert rest == [WireReply(usage + DONE, stream=True, done=True, stats=STATS)]
    assert terminal_stats(ahead) is None and terminal_stats(rest) is STATS


def test_without_a_usage_event_only_done_waits() -> None:
    token = sse('{"choices":[{"delta":{"content":"a \\"usage\\" word"}}]}')  # escaped: no block
    ahead, rest = ahead_of_bill([WireReply(token + DONE, stream=True, done=True, stats=STATS)])
    assert ahead == [WireReply(token, stream=True)]
    assert rest == [WireReply(DONE, stream=True, done=True, stats=STATS)]


def test_named_events_are_cut_between_events() -> None:
    delta = b'event: content_block_delta\ndata: {"delta":{"text":"hi"}}\n\n'
    end = b'event: message_delta\ndata: {"usage":{"output_tokens":1}}\n\n'
    ahead, rest = ahead_of_bill([WireReply(delta + end, stream=True, done=True, stats=STATS)])
    assert ahead == [WireReply(delta, stream=True)]
    assert rest[0].data == end  # type: ignore[union-attr]


def test_nothing_goes_ahead_of_a_usage_block_a_json_reply_or_chunks() -> None:
    usage_first = sse('{"usage":{"prompt_tokens":5}}') + DONE
    for batch in (
        [WireReply(usage_first, stream=True, done=True, stats=STATS)],
        [WireReply(b'{"usage":{}}', stream=False, done=True, stats=STATS)],
        [WireReply(sse("{}"), stream=True)],  # not the terminal
        [GenerationChunk("hi"), STATS],  # SIE generate: the terminal chunk carries text and usage
    ):
        assert ahead_of_bill(batch) == ([], batch)  # type: ignore[arg-type]
