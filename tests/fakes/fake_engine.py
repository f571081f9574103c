"""A small deterministic engine for tests of the layers above the engine. The contract suite
(tests/integration/test_adapter_contract.py) holds it to the same rules as the vLLM adapter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.config import ModelConfig
from app.engine.base import GenerationAdapter, StreamTimer
from app.errors import InputTooLong, ModelLoading
from app.protocol.generation import GenerationChunk, GenerationRequest
from app.protocol.workers import EngineStats

BLOCK_SIZE = 16
MAX_MODEL_LEN = 512
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")


class FakeAdapter(GenerationAdapter):
    """Emits WORDS in a cycle, one token per word, `token_delay_s` apart (0 = instantly).
    Prompt tokens = whitespace-separated words of the prompt or messages."""

    def __init__(self, model: ModelConfig) -> None:
        self.model_id = model.id
        self.token_delay_s = float(model.engine.extra_args.get("token_delay_s", 0.0))
        self.load_delay_s = float(model.engine.extra_args.get("load_delay_s", 0.0))
        self.loaded = False
        self.active: set[str] = set()
        self.aborted: list[str] = []

    async def start(self) -> None:
        await asyncio.sleep(self.load_delay_s)
        self.loaded = True

    async def shutdown(self) -> None:
        self.loaded = False

    def stats(self) -> EngineStats:
        return EngineStats(self.model_id, 64, BLOCK_SIZE, 0.0, len(self.active), MAX_MODEL_LEN)

    @staticmethod
    def prompt_tokens(request: GenerationRequest) -> int:
        if request.messages is not None:
            return sum(len(turn.content.split()) + 2 for turn in request.messages) + 1
        return len((request.prompt or "").split())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if not self.loaded:
            raise ModelLoading(f"model '{self.model_id}' is loading")
        prompt_tokens = self.prompt_tokens(request)
        budget = request.sampling.max_new_tokens or MAX_MODEL_LEN - prompt_tokens
        if prompt_tokens + budget > MAX_MODEL_LEN:
            raise InputTooLong("prompt + max tokens exceed the context", param="prompt")
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
