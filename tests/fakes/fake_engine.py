"""A small deterministic engine for tests of the layers above the engine. The contract suite
(tests/integration/test_adapter_contract.py) holds it to the same rules as the vLLM adapter."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from app.config import ModelConfig
from app.engine.base import GenerationAdapter, StreamTimer, generation_budget
from app.errors import ModelLoading
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

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """One token per word (plus two per chat turn and one for the generation prompt)."""
        if request.messages is not None:
            words = [
                w for turn in request.messages for w in ["<turn>", turn.role, *turn.content.split()]
            ]
            words.append("<assistant>")
        else:
            words = (request.prompt or "").split()
        return [sum(map(ord, word)) % 50_000 for word in words]

    @property
    def context_length(self) -> int:
        return self.max_model_len

    async def generate(
        self, request: GenerationRequest, prompt_token_ids: list[int]
    ) -> AsyncIterator[GenerationChunk]:
        if not self.loaded:
            raise ModelLoading(f"model '{self.model_id}' is loading")
        prompt_tokens = len(prompt_token_ids)
        param = "messages" if request.messages is not None else "prompt"
        budget = generation_budget(
            prompt_tokens, request.sampling.max_new_tokens, self.max_model_len, param
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
