"""A small deterministic engine for tests of the layers above the engine. The contract suite
(tests/integration/test_adapter_contract.py) compares its chunk sequences with the vLLM
adapter's and its chat and completions replies with vLLM's OpenAI layer's (one SSE event per
token, the last token with the finish reason, usage when asked); vLLM's layer itself is tested
on the real engine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from app.config import ModelConfig
from app.engine.base import Admission, GenerationAdapter, StreamTimer, generation_budget
from app.errors import InvalidRequest, ModelLoading
from app.protocol.generation import (
    EngineCounts,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    OpenAICall,
    SamplingOptions,
    StructuredOutput,
    WireReply,
)
from app.protocol.workers import EngineStats

BLOCK_SIZE = 16
MAX_MODEL_LEN = 512
FINGERPRINT = "fake-engine"
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


class FakeAdapter(GenerationAdapter):
    """Emits WORDS in a cycle, one token per word, `token_delay_s` apart (0 = instantly).
    Prompt tokens = whitespace-separated words of the prompt (of the messages' contents)."""

    def __init__(self, model: ModelConfig) -> None:
        self.model_id = model.id
        self.token_delay_s = float(model.engine.extra_args.get("token_delay_s", 0.0))
        self.load_delay_s = float(model.engine.extra_args.get("load_delay_s", 0.0))
        self.kv_blocks = int(model.engine.extra_args.get("kv_blocks", 256))
        self.max_model_len = int(model.engine.extra_args.get("max_model_len", MAX_MODEL_LEN))
        self.loaded = False
        self.active: set[str] = set()
        self.aborted: list[str] = []

    async def start(self) -> None:
        await asyncio.sleep(self.load_delay_s)
        self.loaded = True

    async def shutdown(self) -> None:
        self.loaded = False

    def stats(self) -> EngineStats:
        return EngineStats(
            self.model_id, self.kv_blocks, BLOCK_SIZE, 0.0, len(self.active), self.max_model_len
        )

    async def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """One token per word."""
        return [sum(map(ord, word)) % 50_000 for word in (request.prompt or "").split()]

    @property
    def context_length(self) -> int:
        return self.max_model_len

    async def generate(
        self, request: GenerationRequest, prompt_token_ids: list[int], counts: EngineCounts
    ) -> AsyncIterator[GenerationChunk]:
        """The vLLM adapter's chunk shapes (tests/integration/test_adapter_contract.py compares
        them): each step one token of every unfinished choice; n = 1: the step that ends the
        generation is the terminal chunk (its text, token and logprobs included); n > 1: each
        choice's last chunk carries that choice's finish reason, the terminal only totals."""
        if not self.loaded:
            raise ModelLoading(f"model '{self.model_id}' is loading")
        sampling = request.sampling
        if sampling.n > 1 and sampling.temperature == 0:
            raise InvalidRequest(f"n must be 1 when using greedy sampling, got {sampling.n}")
        prompt_tokens = len(prompt_token_ids)
        budget = generation_budget(
            prompt_tokens, sampling.max_new_tokens, self.max_model_len, "prompt"
        )
        forced = constrained_text(sampling.structured)
        choices = [_Choice(index, budget, sampling.stop, forced) for index in range(sampling.n)]
        top_n = sampling.top_logprobs if sampling.logprobs else None
        timer = StreamTimer()
        self.active.add(request.request_id)
        finished = False
        steps = 0
        try:
            while any(choice.finish_reason is None for choice in choices):
                await asyncio.sleep(self.token_delay_s)  # 0 still yields, like a real engine
                stepping = [c for c in choices if c.finish_reason is None]
                counts.output(prompt_tokens, 0, len(stepping), first=not steps)
                steps += 1
                for choice in stepping:
                    text, token = choice.step()
                    chunk = GenerationChunk(
                        text_delta=text,
                        is_first=bool(text) and timer.saw_text(),
                        token_ids=(token.id,),
                        choice_index=choice.index,
                        logprobs=None if top_n is None else (_logprob(token, top_n),),
                        finish_reason=choice.finish_reason,
                    )
                    if len(choices) == 1 and choice.finish_reason is not None:
                        finished = True
                        yield replace(
                            chunk,
                            done=True,
                            prompt_tokens=prompt_tokens,
                            completion_tokens=choice.tokens,
                            cached_tokens=0,
                            ttft_ms=timer.ttft_ms(),
                            tpot_ms=timer.tpot_ms(choice.tokens),
                        )
                        return
                    yield chunk
            finished = True
            yield timer.terminal(
                "stop",
                prompt_tokens=prompt_tokens,
                completion_tokens=sum(choice.tokens for choice in choices),
                cached_tokens=0,
            )
        finally:
            self.active.discard(request.request_id)
            if not finished:
                self.aborted.append(request.request_id)

    async def serve_openai(
        self, call: OpenAICall, request_id: str, admission: Admission, counts: EngineCounts
    ) -> AsyncIterator[WireReply]:
        if call.route not in ("chat", "completion"):
            raise InvalidRequest(f"the fake engine does not serve /{call.route}")
        body = call.body
        chat = call.route == "chat"
        if chat:
            prompt = " ".join(
                str(m.get("content", "")) for m in body.get("messages") or () if isinstance(m, dict)
            )
        else:
            prompt = str(body.get("prompt", ""))
        limit = (
            body.get("max_completion_tokens") or body.get("max_tokens") or (None if chat else 16)
        )
        stop = body.get("stop") or ()
        request = GenerationRequest(
            request_id,
            self.model_id,
            SamplingOptions(
                max_new_tokens=limit, stop=(stop,) if isinstance(stop, str) else tuple(stop)
            ),
            prompt=prompt,
        )
        prompt_ids = await self.prompt_token_ids(request)
        budget = generation_budget(len(prompt_ids), limit, self.max_model_len, "prompt")
        kind = "chat.completion" if chat else "text_completion"
        event_kind = "chat.completion.chunk" if chat else "text_completion"  # as vLLM names them
        head: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "created": int(time.time()),
            "model": body.get("model"),
        }
        text, stats = "", None
        async with admission.reserve(request_id, prompt_ids, budget, 1):
            if not body.get("stream"):
                async for chunk in self.generate(request, prompt_ids, counts):
                    admission.prefilled(request_id)  # as vLLM's layer does on a first token
                    text += chunk.text_delta
                    stats = chunk if chunk.done else stats
                assert stats is not None
                choice: dict[str, Any] = {"index": 0, "finish_reason": stats.finish_reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                payload = {
                    **head,
                    "object": kind,
                    "choices": [choice],
                    "system_fingerprint": FINGERPRINT,
                    "usage": _usage(stats),
                }
                yield WireReply(json.dumps(payload).encode(), stream=False, done=True, stats=stats)
                return
            role = b""
            if chat:  # vLLM's first chat event: the role, sent with the first output's events
                opening = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                role = _event({**head, "object": event_kind, "choices": [opening]})
            async for chunk in self.generate(request, prompt_ids, counts):
                admission.prefilled(request_id)
                if role:  # (vLLM yields it on its first output, before that output's token)
                    yield WireReply(role, stream=True)
                    role = b""
                if chunk.done:  # vLLM: the last token's text with the finish reason
                    stats = chunk
                    end: dict[str, Any] = {"index": 0, "finish_reason": chunk.finish_reason}
                    end.update(
                        {"delta": {"content": chunk.text_delta}}
                        if chat
                        else {"text": chunk.text_delta}
                    )
                    events = [{**head, "object": event_kind, "choices": [end]}]
                    options = body.get("stream_options") or {}
                    if options.get("include_usage"):
                        usage = {"choices": [], "usage": _usage(chunk)}
                        events.append({**head, "object": event_kind, **usage})
                    events[-1]["system_fingerprint"] = FINGERPRINT  # vLLM: on the last event
                    data = b"".join(_event(e) for e in events) + b"data: [DONE]\n\n"
                    yield WireReply(data, stream=True, done=True, stats=chunk)
                    return
                delta: dict[str, Any] = {"index": 0, "finish_reason": None}
                delta.update(
                    {"delta": {"content": chunk.text_delta}} if chat else {"text": chunk.text_delta}
                )
                yield WireReply(
                    _event({**head, "object": event_kind, "choices": [delta]}), stream=True
                )


@dataclass(frozen=True, slots=True)
class _Token:
    id: int
    text: str


EOS = _Token(0, "")


class _Choice:
    """One candidate: WORDS from its own offset (or the constrained text, then EOS), cut at the
    first stop string as vLLM cuts it (the text before it; the token that completed it)."""

    def __init__(self, index: int, budget: int, stop: tuple[str, ...], forced: str | None) -> None:
        self.index, self.budget, self.stop, self.forced = index, budget, stop, forced
        self.text = ""
        self.tokens = 0
        self.finish_reason: FinishReason | None = None

    def step(self) -> tuple[str, _Token]:
        """The next token and the text it adds; sets `finish_reason` when the choice ends."""
        if self.forced is not None:
            token = _Token(self.tokens + 1, self.forced) if self.tokens == 0 else EOS
            self.finish_reason = "stop" if token is EOS else None
        else:
            word = WORDS[(self.tokens + self.index) % len(WORDS)] + " "
            token = _Token(sum(map(ord, word)) % 50_000, word)
        self.tokens += 1
        combined = self.text + token.text
        cut = min((p for p in (combined.find(s) for s in self.stop) if p >= 0), default=None)
        if cut is not None:
            combined, self.finish_reason = combined[: max(cut, len(self.text))], "stop"
        delta, self.text = combined[len(self.text) :], combined
        if self.finish_reason is None and self.tokens >= self.budget:
            self.finish_reason = "length"
        return delta, token


def constrained_text(structured: StructuredOutput | None) -> str | None:
    """What constrained decoding makes the fake say: the shortest match of a regex (from
    hypothesis, which generates strings from regexes), `{}` for any JSON object; other kinds
    are refused rather than ignored."""
    if structured is None:
        return None
    if structured.kind == "json_object":
        return "{}"
    if structured.kind == "regex" and structured.spec is not None:
        from hypothesis import find, settings, strategies

        pattern = strategies.from_regex(structured.spec, fullmatch=True)
        return find(pattern, lambda _: True, settings=settings(database=None))
    raise InvalidRequest(f"the fake engine does not constrain output to {structured.kind}")


def _logprob(token: _Token, top_n: int) -> dict[str, Any]:
    """vLLM's entry shape: the chosen token first among its alternatives."""
    alternatives = [token.text, *(word + " " for word in WORDS if word + " " != token.text)]
    return {
        **_logprob_entry(token.text, -0.25),
        "top_logprobs": [
            _logprob_entry(text, -0.25 * (rank + 1))
            for rank, text in enumerate(alternatives[:top_n])
        ],
    }


def _logprob_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _usage(chunk: GenerationChunk) -> dict[str, int]:
    prompt, completion = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
