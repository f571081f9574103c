"""A small deterministic engine for tests of the layers above the engine. The contract suite
(tests/integration/test_adapter_contract.py) holds it to the same rules as the vLLM adapter.
Its OpenAI routes imitate vLLM's wire shapes for chat and completions (one SSE event per token,
usage when asked), enough for the layers above; vLLM's own layer is tested on the real engine."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from app.config import ModelConfig
from app.engine.base import Admission, GenerationAdapter, StreamTimer, generation_budget
from app.errors import InvalidRequest, ModelLoading
from app.protocol.generation import (
    GenerationChunk,
    GenerationRequest,
    OpenAICall,
    SamplingOptions,
    WireReply,
)
from app.protocol.workers import EngineStats

BLOCK_SIZE = 16
MAX_MODEL_LEN = 512
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
        self, request: GenerationRequest, prompt_token_ids: list[int]
    ) -> AsyncIterator[GenerationChunk]:
        if not self.loaded:
            raise ModelLoading(f"model '{self.model_id}' is loading")
        prompt_tokens = len(prompt_token_ids)
        budget = generation_budget(
            prompt_tokens, request.sampling.max_new_tokens, self.max_model_len, "prompt"
        )
        timer = StreamTimer()
        self.active.add(request.request_id)
        finished = False
        text = ""
        try:
            for index in range(budget):
                await asyncio.sleep(self.token_delay_s)  # 0 still yields, like a real engine
                word = WORDS[index % len(WORDS)] + " "
                text += word
                stop = next((s for s in request.sampling.stop if s in text), None)
                if stop is not None:
                    finished = True
                    yield timer.terminal(
                        "stop", prompt_tokens=prompt_tokens, completion_tokens=index + 1
                    )
                    return
                yield GenerationChunk(
                    text_delta=word, is_first=timer.saw_text(), token_ids=(index,)
                )
            finished = True
            yield timer.terminal("length", prompt_tokens=prompt_tokens, completion_tokens=budget)
        finally:
            self.active.discard(request.request_id)
            if not finished:
                self.aborted.append(request.request_id)

    async def serve_openai(
        self, call: OpenAICall, request_id: str, admission: Admission
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
        head: dict[str, Any] = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "created": int(time.time()),
            "model": body.get("model"),
        }
        text, stats = "", None
        async with admission.reserve(request_id, prompt_ids, budget, 1):
            if not body.get("stream"):
                async for chunk in self.generate(request, prompt_ids):
                    admission.prefilled(request_id)  # as vLLM's layer does on a first token
                    text += chunk.text_delta
                    stats = chunk if chunk.done else stats
                assert stats is not None
                choice: dict[str, Any] = {"index": 0, "finish_reason": stats.finish_reason}
                if chat:
                    choice["message"] = {"role": "assistant", "content": text}
                else:
                    choice["text"] = text
                payload = {**head, "object": kind, "choices": [choice], "usage": _usage(stats)}
                yield WireReply(json.dumps(payload).encode(), stream=False, done=True, stats=stats)
                return
            if chat:  # vLLM's first chat event: the role, before any token
                role = {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
                yield WireReply(
                    _event({**head, "object": f"{kind}.chunk", "choices": [role]}), stream=True
                )
            async for chunk in self.generate(request, prompt_ids):
                admission.prefilled(request_id)
                if chunk.done:
                    stats = chunk
                    end: dict[str, Any] = {"index": 0, "finish_reason": chunk.finish_reason}
                    end.update({"delta": {}} if chat else {"text": ""})
                    events = [{**head, "object": f"{kind}.chunk", "choices": [end]}]
                    options = body.get("stream_options") or {}
                    if options.get("include_usage"):
                        events.append({**head, "choices": [], "usage": _usage(chunk)})
                    data = b"".join(_event(e) for e in events) + b"data: [DONE]\n\n"
                    yield WireReply(data, stream=True, done=True, stats=chunk)
                    return
                delta: dict[str, Any] = {"index": 0, "finish_reason": None}
                delta.update(
                    {"delta": {"content": chunk.text_delta}} if chat else {"text": chunk.text_delta}
                )
                yield WireReply(
                    _event({**head, "object": f"{kind}.chunk", "choices": [delta]}), stream=True
                )


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _usage(chunk: GenerationChunk) -> dict[str, int]:
    prompt, completion = chunk.prompt_tokens or 0, chunk.completion_tokens or 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
