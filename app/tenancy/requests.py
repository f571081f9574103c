"""Tenancy of one request: its pool's defaults (priority, share weight), its limit ticket, and
what it is billed (from the engine's counts). Pure; the ingress's ServeBackend and the
Generator call these."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable

from app.config import AppConfig, Limits
from app.pools.model import DEFAULT_POOL, PoolRecord, normalize_name
from app.protocol.generation import (
    EngineCounts,
    GenerationChunk,
    GenerationRequest,
    StreamBatch,
    WireReply,
)
from app.tenancy.keys import NO_KEY
from app.tenancy.limits import Ticket, estimate_tokens, subjects_for
from app.tenancy.usage import UsageRecord

UNMETERED_ROUTES = frozenset({"tokenize", "detokenize", "count_tokens"})
"""OpenAI routes that generate nothing: neither limited nor counted."""
PRIORITY_HEADER = "x-vllm-priority"
"""vLLM's own header for a request's priority (it wins over the body's `priority` there too)."""


def metered(request: GenerationRequest) -> bool:
    return request.openai is None or request.openai.route not in UNMETERED_ROUTES


def tenant_pool(request: GenerationRequest) -> str:
    return normalize_name(request.pool) if request.pool else DEFAULT_POOL


def with_pool_defaults(request: GenerationRequest, record: PoolRecord | None) -> GenerationRequest:
    """The request with its effective priority (its own, else its pool's default), its
    pool's share weight and its member of the pool's share (its key, when the pool shares by
    key); an OpenAI call carries the priority to vLLM in vLLM's header."""
    priority = request.priority
    if priority is None:
        priority = record.spec.priority if record is not None else 0
    weight = record.spec.weight if record is not None else 1.0
    member = request.key_id or NO_KEY if record is not None and record.spec.share_by_key else ""
    call = request.openai
    if call is not None:
        headers = tuple((n, v) for n, v in call.headers if n.lower() != PRIORITY_HEADER)
        call = dataclasses.replace(call, headers=(*headers, (PRIORITY_HEADER, str(priority))))
    return dataclasses.replace(
        request, priority=priority, share_weight=weight, share_member=member, openai=call
    )


def ticket_for(request: GenerationRequest, config: AppConfig, record: PoolRecord | None) -> Ticket:
    """The limits that apply to the request (its pool's, its key's) and its token reservation
    (`estimate_tokens`: an upper bound, from the body's size, the prompts and the budgets)."""
    key_id = request.key_id or NO_KEY
    if not metered(request):
        return Ticket(request.request_id, (), 0)
    pool_limits: Limits | None = record.spec.limits if record is not None else None
    subjects = subjects_for(
        tenant_pool(request), pool_limits, key_id, config.tenancy.limits_for_key(key_id)
    )
    if not subjects:
        return Ticket(request.request_id, (), 0)
    sampling = request.sampling
    served = config.model(request.model)
    return Ticket(
        request_id=request.request_id,
        subjects=subjects,
        estimated_tokens=estimate_tokens(
            prompt_bytes(request),
            sampling.max_new_tokens,
            max(sampling.n, sampling.best_of or 0),
            config.tenancy.default_completion_tokens,
            served.engine.max_model_len if served is not None else 0,
            prompt_count(request),
        ),
    )


def prompt_bytes(request: GenerationRequest) -> int:
    """Bytes that hold every text the engine's prompt is made of: an OpenAI call's whole body
    as received (UTF-8 of its strings or longer, with escapes), a native call's prompt."""
    call = request.openai
    if call is not None:
        return call.size_bytes or len(json.dumps(call.body))  # (0: built without a body size)
    prompt = request.prompt or ""
    return len(prompt) if prompt.isascii() else len(prompt.encode("utf-8"))


def prompt_count(request: GenerationRequest) -> int:
    """Engine requests the call makes, one per prompt: a completions call's batch of prompts
    (strings or token lists), else 1."""
    call = request.openai
    if call is None or call.route != "completion":
        return 1
    prompt = call.body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def terminal_stats(batch: Iterable[GenerationChunk | WireReply]) -> GenerationChunk | None:
    """The terminal chunk of a batch (a generation's, or the stats of vLLM's last reply)."""
    for item in batch:
        if isinstance(item, WireReply):
            if item.done and item.stats is not None:
                return item.stats
        elif item.done:
            return item
    return None


def ahead_of_bill(batch: StreamBatch) -> tuple[StreamBatch, StreamBatch]:
    """(what may go out before the request's bill, the rest) of its terminal batch. A streamed
    reply's SSE events up to the first that carries a usage block (or to `[DONE]`) go ahead:
    the last tokens do not wait for the ledger's round trip, and no client holds a usage block
    the ledger lacks. Anything else waits whole."""
    if len(batch) != 1:
        return [], batch
    reply = batch[0]
    if not isinstance(reply, WireReply) or not reply.stream or not reply.done:
        return [], batch
    data = reply.data
    held = data.find(b'"usage"')  # (a JSON string holding it would have escaped quotes)
    if held < 0:
        held = data.rfind(b"data: [DONE]")
    if held < 0:
        return [], batch
    cut = data.rfind(b"\n\n", 0, held) + 2  # the end of the last event before it
    if cut < 2:
        return [], batch
    return (
        [WireReply(data[:cut], stream=True)],
        [WireReply(data[cut:], stream=True, done=True, stats=reply.stats)],
    )


def engine_usage(request: GenerationRequest, counts: EngineCounts) -> UsageRecord | None:
    """What the request is billed: the engine's own counts, however it ended (finished,
    cancelled, failed or refused mid-way). None: not metered, or it never reached the engine
    (no engine request produced output)."""
    if not metered(request) or not counts.engine_requests:
        return None
    return UsageRecord(
        request_id=request.request_id,
        pool=tenant_pool(request),
        model=request.model,
        key_id=request.key_id or NO_KEY,
        prompt_tokens=counts.prompt_tokens,
        cached_prompt_tokens=counts.cached_tokens,
        completion_tokens=counts.completion_tokens,
    )
