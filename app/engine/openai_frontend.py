"""vLLM's own OpenAI layer on the worker: its request models and their sampling parameters, chat
templates, tool-call and reasoning parsers, `/tokenize` and `/detokenize`, and its Anthropic
Messages layer, built by vLLM's `init_app_state` exactly as `vllm serve` builds them. What we add sits around each engine
request: a KV handle from our ledger before the engine sees it (`AdmittedEngine`), and the
stats our metrics need. Imports vllm (the engine package is the only place that may)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from argparse import Namespace
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

from pydantic import BaseModel, TypeAdapter, ValidationError

from app.engine.anthropic import ANTHROPIC_ROUTES, error_event, error_event_message, ignored_fields
from app.engine.base import Admission
from app.errors import (
    GenerationFailed,
    InputTooLong,
    InvalidRequest,
    ModelNotFound,
    ServiceError,
    UnsupportedField,
    WorkerUnavailable,
)
from app.protocol.generation import EngineCounts, GenerationChunk, OpenAICall, WireReply

logger = logging.getLogger(__name__)


# SIE contract fields (the ingress routes on the first two); those a route's vLLM request model
# does not know are taken out before vLLM validates the body.
SIE_FIELDS = frozenset({"routing_key", "prompt_cache_key", "lora_adapter", "safety_identifier"})

# how vLLM's messages say that the prompt (+ max_tokens) does not fit the model's context
CONTEXT_SIGNS = ("maximum context length", "max_model_len")
_ERROR_EVENT = 'data: {"error"'

# route -> (attribute of vLLM's app state, its method)
_SERVING = {
    "chat": ("openai_serving_chat", "create_chat_completion"),
    "completion": ("openai_serving_completion", "create_completion"),
    "responses": ("openai_serving_responses", "create_responses"),
    "tokenize": ("serving_tokenization", "create_tokenize"),
    "detokenize": ("serving_tokenization", "create_detokenize"),
    "messages": ("anthropic_serving_messages", "create_messages"),
    "count_tokens": ("anthropic_serving_messages", "count_tokens"),
}


@dataclass
class CallBook:
    """What the engine requests of one OpenAI call did (vLLM may start several: one per prompt
    of a completion list). Reached through a context variable, since vLLM calls the engine."""

    admission: Admission | None = None
    counts: EngineCounts = field(default_factory=EngineCounts)
    started: float = field(default_factory=time.perf_counter)
    refusal: ServiceError | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    def stats(self) -> GenerationChunk:
        ttft = tpot = None
        counts = self.counts
        if self.first_token_at is not None:
            ttft = (self.first_token_at - self.started) * 1000
            if counts.completion_tokens > 1 and self.last_token_at is not None:
                gaps = counts.completion_tokens - 1
                tpot = (self.last_token_at - self.first_token_at) * 1000 / gaps
        return GenerationChunk(
            text_delta="",
            done=True,
            finish_reason="stop",
            prompt_tokens=counts.prompt_tokens,
            completion_tokens=counts.completion_tokens,
            cached_tokens=counts.cached_tokens,
            ttft_ms=ttft,
            tpot_ms=tpot,
        )


_CALL: contextvars.ContextVar[CallBook | None] = contextvars.ContextVar(
    "poolserve_openai_call", default=None
)


class AdmittedEngine:
    """The engine client vLLM's serving classes get: the AsyncLLM itself, except that each
    `generate` first holds a KV handle sized from the rendered prompt and vLLM's final
    `max_tokens` x `n`, for as long as the request runs. A refusal (QUEUE_FULL,
    INPUT_TOO_LONG) is noted on the call's book, so the worker answers with our status and
    code rather than with the error event vLLM makes of it."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def generate(
        self, prompt: Any, sampling_params: Any, request_id: str, **kwargs: Any
    ) -> AsyncGenerator[Any, None]:
        return self._admitted(prompt, sampling_params, request_id, kwargs)

    async def _admitted(
        self, prompt: Any, params: Any, request_id: str, kwargs: dict[str, Any]
    ) -> AsyncGenerator[Any, None]:
        book = _CALL.get()
        if book is None or book.admission is None:  # not one of our calls: nothing to admit
            async for output in self._engine.generate(prompt, params, request_id, **kwargs):
                yield output
            return
        token_ids = list(prompt.get("prompt_token_ids") or ()) if isinstance(prompt, dict) else []
        candidates = max(1, int(getattr(params, "n", 1) or 1))
        max_tokens = int(getattr(params, "max_tokens", 0) or 0)
        lora = kwargs.get("lora_request")
        salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        namespace = f"{getattr(lora, 'lora_name', '')}\x1f{salt or ''}"
        admission = book.admission
        try:
            async with admission.reserve(
                request_id, token_ids, max(1, max_tokens), candidates, namespace
            ):
                outputs = counted_outputs(
                    self._engine, prompt, params, request_id, book.counts, len(token_ids), kwargs
                )
                async with contextlib.aclosing(outputs):
                    async for output in outputs:
                        if any(each.token_ids for each in output.outputs):
                            now = time.perf_counter()
                            if book.first_token_at is None:
                                admission.prefilled(request_id)
                            book.first_token_at = book.first_token_at or now
                            book.last_token_at = now
                        yield output
        except ServiceError as refusal:
            book.refusal = refusal
            raise


async def counted_outputs(
    engine: Any,
    prompt: Any,
    params: Any,
    request_id: str,
    counts: EngineCounts,
    prompt_tokens: int,
    options: dict[str, Any],
) -> AsyncGenerator[Any, None]:
    """`AsyncLLM.generate(prompt, params, request_id, **options)`, with every output that
    vLLM's stat logger counts counted into `counts` too, however the request ends.

    vLLM counts tokens as its output handler processes them, not as they are read. A request
    in FINAL_ONLY mode (what vLLM's OpenAI layer asks for a reply that is not streamed) gets no
    output at all before its end, and a streamed one cancelled just after an output was put in
    its collector leaves that output there; `generate` then aborts without reading either. So
    a request left before its end is aborted here, which stops vLLM counting for it, and then
    what its collector holds is counted: the abort's final output, which carries the tokens
    vLLM counted and nobody read (all of them in FINAL_ONLY mode). The rest mirrors
    `generate`: its errors are raised as `generate` raises them."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    queue: Any = None
    finished = prefilled = False

    def count(output: Any) -> None:
        nonlocal prefilled
        produced = sum(len(each.token_ids) for each in output.outputs)
        first = produced > 0 and not prefilled  # vLLM counts the prompt with its first token
        counts.output(prompt_tokens, int(output.num_cached_tokens or 0), produced, first)
        prefilled = prefilled or first

    counts.open_requests += 1
    try:
        try:
            queue = await engine.add_request(request_id, prompt, params, **options)
        except asyncio.CancelledError:
            # vLLM may hold it already (n = 1 is registered before it is sent to the core)
            await engine.abort(request_id)
            raise
        while not finished:
            output = queue.get_nowait() or await queue.get()
            finished = bool(output.finished)
            count(output)
            if finished:  # all counted
                counts.open_requests -= 1
            yield output
    except (EngineDeadError, VLLMClientError, GracefulHTTPError):
        raise
    except Exception as error:  # as `generate` wraps it
        raise EngineGenerateError() from error
    finally:
        try:
            if queue is not None and not finished:
                await engine.abort(queue.request_id, internal=True)
        finally:
            # vLLM stops counting the request as its abort begins (before its first await);
            # what it counted and nobody read is in the collector, merged into one output
            if queue is not None and not finished:
                with contextlib.suppress(Exception):  # an engine failure it holds
                    if (unread := queue.get_nowait()) is not None:
                        count(unread)
            if queue is not None:
                queue.close()
            if not finished:
                counts.open_requests -= 1


def _request_models() -> dict[str, tuple[TypeAdapter[Any], frozenset[str]]]:
    """route -> (vLLM's request model as a validator, the top-level fields it knows)."""
    from vllm.entrypoints.anthropic.protocol import (
        AnthropicCountTokensRequest,
        AnthropicMessagesRequest,
    )
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.serve.tokenize.protocol import (
        DetokenizeRequest,
        TokenizeChatRequest,
        TokenizeCompletionRequest,
        TokenizeRequest,
    )

    def fields(*models: type[BaseModel]) -> frozenset[str]:
        return frozenset(name for model in models for name in model.model_fields)

    return {
        "chat": (TypeAdapter(ChatCompletionRequest), fields(ChatCompletionRequest)),
        "completion": (TypeAdapter(CompletionRequest), fields(CompletionRequest)),
        "responses": (TypeAdapter(ResponsesRequest), fields(ResponsesRequest)),
        "tokenize": (
            TypeAdapter(TokenizeRequest),
            fields(TokenizeCompletionRequest, TokenizeChatRequest),
        ),
        "detokenize": (TypeAdapter(DetokenizeRequest), fields(DetokenizeRequest)),
        "messages": (TypeAdapter(AnthropicMessagesRequest), fields(AnthropicMessagesRequest)),
        "count_tokens": (
            TypeAdapter(AnthropicCountTokensRequest),
            fields(AnthropicCountTokensRequest),
        ),
    }


class OpenAIFrontend:
    """vLLM's OpenAI serving objects for one loaded model."""

    def __init__(self, state: Any, model_id: str) -> None:
        self._state = state
        self._model_id = model_id
        self._requests = _request_models()

    @classmethod
    async def build(
        cls,
        engine: Any,
        engine_args: Any,
        frontend: dict[str, Any],
        model_id: str,
    ) -> OpenAIFrontend:
        """`frontend`: vLLM's front-end options (`vllm serve`'s flags: `tool_call_parser`,
        `enable_auto_tool_choice`, `chat_template`, `lora_modules`, ...)."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import FrontendArgs

        args = Namespace(**(vars(FrontendArgs(**frontend)) | vars(engine_args)))
        state = State()
        await init_app_state(
            cast(Any, AdmittedEngine(engine)),
            state=state,
            args=args,
            supported_tasks=await engine.get_supported_tasks(),
        )
        quiet_refusals()
        return cls(state, model_id)

    def _validated(self, call: OpenAICall) -> tuple[Any, tuple[int, bool] | None]:
        """vLLM's request model of the body (SIE-only fields taken out), and the best_of plan."""
        from vllm.exceptions import VLLMValidationError

        body = dict(call.body)
        ranking = best_of_plan(call.route, body)  # SIE's best_of, which vLLM 0.32 has not
        adapter = body.pop("lora_adapter", None)
        if isinstance(adapter, str) and adapter:
            body["model"] = adapter  # vLLM names a LoRA adapter in `model`
        validator, known = self._requests[call.route]
        for name in SIE_FIELDS - known:
            body.pop(name, None)  # SIE-only: routing and metadata, the ingress used them
        try:
            request = validator.validate_python(body)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first.get("loc", ()) if part != call.route)
            message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
            raise InvalidRequest(message, param=where or None) from None
        except VLLMValidationError as error:
            raise InvalidRequest(str(error), param=error.parameter) from None
        except (ValueError, TypeError) as error:
            raise InvalidRequest(str(error)) from None
        if call.route in ANTHROPIC_ROUTES:  # its models drop extras: walk the body beside it
            unknown = next(ignored_fields(body, request), None)
        else:
            unknown = next(unknown_fields(request), None)
        if unknown is not None:
            raise UnsupportedField(unknown)
        if getattr(request, "use_beam_search", False):
            raise UnsupportedField(
                "use_beam_search",
                "beam search is not served: vLLM runs it as one engine request per beam per "
                "step, and requests are billed what the engine did",
            )
        return request, ranking

    async def serve(
        self, call: OpenAICall, request_id: str, admission: Admission, counts: EngineCounts
    ) -> AsyncIterator[WireReply]:
        """The reply as vLLM's server makes it: one JSON body, or SSE events as they come."""
        from starlette.requests import Request

        request, ranking = self._validated(call)
        refusal = admission.refusal_now()  # before vLLM renders and tokenizes the prompt
        if refusal is not None:
            raise refusal
        attribute, method = _SERVING[call.route]
        serving = getattr(self._state, attribute, None)
        if serving is None:
            raise InvalidRequest(f"this model does not serve /{call.route}")
        headers = [(b"x-request-id", request_id.encode())] + [
            (name.encode(), value.encode()) for name, value in call.headers
        ]
        raw = Request(
            {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
        )
        book = CallBook(admission, counts)
        _CALL.set(book)  # this task's; vLLM calls the engine from within it
        try:
            result = await getattr(serving, method)(request, raw)
        except ServiceError:
            raise
        except Exception as error:  # noqa: BLE001 - vLLM maps it, as its server does
            if book.refusal is not None:
                raise book.refusal from None
            result = serving.create_error_response(error)
        if book.refusal is not None:
            raise book.refusal
        if isinstance(result, AsyncIterator):
            if call.route == "responses":  # event objects: vLLM's router writes them as SSE
                from vllm.entrypoints.openai.responses.api_router import (
                    _convert_stream_to_sse_events,
                )

                result = _convert_stream_to_sse_events(cast(Any, result))
            async for reply in self._events(result, book, request_id):
                yield reply
            return
        if _is_error(result):
            raise _service_error(result, str(call.body.get("model", "")), request_id)
        if call.route in ANTHROPIC_ROUTES:  # as vLLM's Anthropic router writes them
            data = result.model_dump_json(exclude_none=True).encode()
        elif ranking is None:
            # as vLLM's routers write them (Responses by alias: `text.format.schema`)
            data = result.model_dump_json(by_alias=call.route == "responses").encode()
        else:
            data = json.dumps(keep_best(result.model_dump(), *ranking)).encode()
        yield WireReply(data=data, stream=False, done=True, stats=book.stats())

    async def _events(
        self, events: AsyncIterator[str], book: CallBook, request_id: str
    ) -> AsyncIterator[WireReply]:
        try:
            first = await anext(events, None)
            if book.refusal is not None:  # before any byte: our status and code
                raise book.refusal
            if first is None:
                return
            yield WireReply(public_event(first, request_id).encode(), stream=True)
            async for event in events:
                yield WireReply(public_event(event, request_id).encode(), stream=True)
            yield WireReply(b"", stream=True, done=True, stats=book.stats())
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()


class _NotOurRefusals(logging.Filter):
    """vLLM's serving layers log whatever the engine's generator raises, with its traceback, at
    ERROR ("Error in chat completion stream generator."). Ours are refusals (a waiter displaced
    from a full queue, a wait past `kv.max_wait_seconds`) answered with their own code: under a
    flood each cost a traceback's formatting on the worker's loop, and the log a dozen lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, ServiceError)


_QUIET = _NotOurRefusals()


def quiet_refusals() -> None:
    """On every logger of vLLM's serving layers (their modules are imported by now)."""
    for name, each in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("vllm.entrypoints") and isinstance(each, logging.Logger):
            if _QUIET not in each.filters:
                each.addFilter(_QUIET)


def best_of_plan(route: str, body: dict[str, Any]) -> tuple[int, bool] | None:
    """The SIE contract's `best_of` on chat and completions (buffered; >= n; 1..128): ask vLLM
    for `best_of` candidates with logprobs, then keep the `n` best (`keep_best`). Rewrites
    `body` for vLLM; returns (n, whether the client asked for logprobs), or None when there is
    nothing to rank."""
    if route not in ("chat", "completion") or "best_of" not in body:
        return None
    best_of = body.pop("best_of")
    n = body.get("n") or 1
    if best_of is None:
        return None
    if isinstance(best_of, bool) or not isinstance(best_of, int) or not 1 <= best_of <= 128:
        raise InvalidRequest("best_of must be an integer in [1, 128]", param="best_of")
    if body.get("stream"):
        raise InvalidRequest("best_of cannot be streamed", param="best_of")
    if not isinstance(n, int) or best_of < n:
        raise InvalidRequest("best_of must be >= n", param="best_of")
    if best_of == n:
        return None
    if body.get("temperature") == 0:
        raise InvalidRequest(
            "best_of > n ranks sampled candidates: it needs temperature > 0", param="best_of"
        )
    asked = bool(body.get("logprobs"))
    body["n"] = best_of
    body["logprobs"] = True if route == "chat" else max(1, int(body.get("logprobs") or 0))
    return n, asked


def keep_best(payload: dict[str, Any], keep: int, expose_logprobs: bool) -> dict[str, Any]:
    """The `keep` choices with the highest cumulative token logprob, renumbered from 0 (usage
    still counts every candidate generated, as the SIE contract says)."""

    def score(choice: dict[str, Any]) -> float:
        logprobs = choice.get("logprobs") or {}
        if "content" in logprobs:  # chat
            return float(sum(entry["logprob"] for entry in logprobs["content"] or ()))
        return sum(value or 0.0 for value in logprobs.get("token_logprobs") or ())

    best = sorted(payload["choices"], key=score, reverse=True)[:keep]
    for index, choice in enumerate(best):
        choice["index"] = index
        if not expose_logprobs:
            choice["logprobs"] = None
    return {**payload, "choices": best}


def unknown_fields(value: Any, path: str = "") -> Iterator[str]:
    """Fields vLLM's request models kept as extras (they accept and ignore them), nested ones
    too (e.g. `stream_options.x`), as dotted paths."""
    if isinstance(value, BaseModel):
        for name in sorted(value.model_extra or {}):
            yield f"{path}{name}"
        for name in type(value).model_fields:
            yield from unknown_fields(getattr(value, name, None), f"{path}{name}.")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from unknown_fields(item, f"{path.rstrip('.')}[{index}].")


def _is_error(result: Any) -> bool:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    return isinstance(result, ErrorResponse)


def public_event(event: str, request_id: str) -> str:
    """An SSE event as the client gets it: vLLM's in-band error for a server-side failure
    carries the exception's text, which goes to the log with the request id instead (an
    Anthropic stream's gets Anthropic's type for it, `api_error`)."""
    internal = error_event_message(event)
    if internal is not None:
        return error_event("api_error", _logged(internal, request_id))
    if not event.startswith(_ERROR_EVENT):
        return event
    try:
        payload = json.loads(event[len("data: ") :])
        error = payload["error"]
        status = int(error.get("code") or 500)
    except (ValueError, KeyError, TypeError, AttributeError):
        return event
    if status < 500:
        return event
    error["message"] = _logged(str(error.get("message")), request_id)
    return f"data: {json.dumps(payload)}\n\n"


def _logged(internal: str, request_id: str) -> str:
    """The public text for a server-side failure; the internal one goes to the log."""
    logger.error("request %s failed in the engine: %s", request_id, internal)
    return f"the engine failed to serve this request (request id {request_id}; see the logs)"


def _service_error(result: Any, model: str, request_id: str) -> ServiceError:
    """vLLM's ErrorResponse -> ours: its message for a bad request, our status and codes; a
    server-side failure's text goes to the log with the request id, not to the client."""
    info = result.error
    status = int(info.code)
    if status == 404:
        return ModelNotFound(model)
    if status < 500 and any(sign in info.message for sign in CONTEXT_SIGNS):
        return InputTooLong(info.message, param=info.param)  # the SIE contract's code for it
    if status < 500:
        return InvalidRequest(info.message, param=info.param)
    if status == 503:
        return WorkerUnavailable(_logged(info.message, request_id))
    return GenerationFailed(_logged(info.message, request_id))
