"""The vLLM engine behind the GenerationAdapter contract: one AsyncLLM per (worker, model).
The only module of the project that imports vllm."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from app.config import ModelConfig
from app.engine.base import GenerationAdapter, StreamTimer
from app.engine.default_model import resolve_model_source
from app.errors import InputTooLong, InvalidRequest, ModelLoading
from app.protocol.generation import FinishReason, GenerationChunk, GenerationRequest
from app.protocol.workers import EngineStats

logger = logging.getLogger(__name__)

_FINISH_REASONS: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "error": "error",
}


def engine_environment(model: ModelConfig) -> dict[str, str]:
    """Environment vLLM reads at import/start; set before the first vllm import."""
    return {
        "VLLM_CPU_KVCACHE_SPACE": f"{model.engine.cpu_kv_cache_gib:g}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }


class VLLMAdapter(GenerationAdapter):
    def __init__(self, model: ModelConfig) -> None:
        self.model_id = model.id
        self._config = model
        self._engine: Any = None
        self._tokenizer: Any = None
        self._max_model_len = model.engine.max_model_len

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    async def start(self) -> None:
        os.environ.update(engine_environment(self._config))
        source = await asyncio.to_thread(resolve_model_source, self._config.source)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        settings = self._config.engine
        arguments = AsyncEngineArgs(
            model=source,
            served_model_name=[self._config.id],
            dtype=settings.dtype,
            enforce_eager=settings.enforce_eager,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            enable_prefix_caching=settings.enable_prefix_caching,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            disable_log_stats=False,
            **settings.extra_args,
        )
        logger.info("starting vLLM for %s from %s", self._config.id, source)
        engine = await asyncio.to_thread(AsyncLLM.from_engine_args, arguments)
        self._tokenizer = engine.get_tokenizer()
        self._max_model_len = engine.model_config.max_model_len
        self._engine = engine

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    def stats(self) -> EngineStats:
        engine = self._engine
        if engine is None:
            return EngineStats(self.model_id, 0, 0, 0.0, 0, self._max_model_len)
        cache = engine.vllm_config.cache_config
        return EngineStats(
            model=self.model_id,
            kv_blocks_total=int(cache.num_gpu_blocks or 0),
            kv_block_size_tokens=int(cache.block_size),
            kv_usage_fraction=0.0,
            running_requests=engine.get_num_unfinished_requests(),
            max_model_len=self._max_model_len,
        )

    def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        tokenizer = self._tokenizer
        if request.messages is not None:
            messages = [{"role": turn.role, "content": turn.content} for turn in request.messages]
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return list(tokenizer.encode(text, add_special_tokens=False))
        return list(tokenizer.encode(request.prompt or ""))

    def _sampling_params(self, request: GenerationRequest, prompt_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = request.sampling
        room = self._max_model_len - prompt_tokens
        param = "messages" if request.messages is not None else "prompt"
        if room <= 0:
            raise InputTooLong(
                f"prompt has {prompt_tokens} tokens; the model's context is {self._max_model_len}",
                param=param,
            )
        max_tokens = sampling.max_new_tokens if sampling.max_new_tokens is not None else room
        if max_tokens > room:
            raise InputTooLong(
                f"prompt ({prompt_tokens} tokens) + max tokens ({max_tokens}) exceeds the "
                f"model's context of {self._max_model_len} tokens",
                param=param,
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k or 0,
            stop=list(sampling.stop) or None,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            repetition_penalty=sampling.repetition_penalty,
            seed=sampling.seed,
            logit_bias=dict(sampling.logit_bias) or None,
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        engine = self._engine
        if engine is None:
            raise ModelLoading(f"model '{self.model_id}' is loading")
        prompt_ids = self.prompt_token_ids(request)
        params = self._sampling_params(request, len(prompt_ids))
        timer = StreamTimer()
        completion_tokens = 0
        finished = False
        outputs = engine.generate({"prompt_token_ids": prompt_ids}, params, request.request_id)
        try:
            try:
                first = await anext(outputs)
            except ValueError as error:  # vLLM's input validation (e.g. logit_bias token ids)
                raise InvalidRequest(str(error)) from error
            output = first
            while True:
                completion = output.outputs[0]
                completion_tokens += len(completion.token_ids)
                if output.finished:
                    finished = True
                    if completion.text:
                        timer.saw_text()
                    yield timer.terminal(
                        _FINISH_REASONS.get(completion.finish_reason, "stop"),
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=completion_tokens,
                        cached_tokens=output.num_cached_tokens,
                        text_delta=completion.text,
                    )
                    return
                if completion.text or completion.token_ids:
                    is_first = bool(completion.text) and timer.saw_text()
                    yield GenerationChunk(
                        text_delta=completion.text,
                        is_first=is_first,
                        token_ids=tuple(completion.token_ids),
                    )
                output = await anext(outputs)
        finally:
            await outputs.aclose()
            if not finished:
                await engine.abort(request.request_id)
