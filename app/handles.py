"""Programmatic access for Ray jobs and drivers, without HTTP.

    client = connect("poolserve")
    client.generate("Once upon a time", max_new_tokens=32)          # sageLLM Response
    client.chat([{"role": "user", "content": "Hi"}], max_tokens=32)   # sageLLM Response
    client.messages([{"role": "user", "content": "Hi"}], max_tokens=32)  # Anthropic Message
    for event in client.stream(prompt="...", max_new_tokens=32): ...  # start, delta..., end
    async for event in client.astream(messages=[...]): ...

Requests go through the ingress's own `ServeBackend` (same PoolAutoscaler snapshot, routing and
admission, same Generator handles with `stream=True`) and are validated as HTTP's are (chat
and messages by vLLM's own request models on the worker), so `pool=` / `profile=` behave like the `X-SIE-Pool` /
`X-SIE-MACHINE-PROFILE` headers. Failures raise the typed `app.errors` exceptions. Closing a
stream early (break + close, `with`, `aclose()`) cancels the engine request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any, TypeVar, cast

from pydantic import ValidationError
from ray import serve

from app.api.convert import POOL_HEADER, PROFILE_HEADER, generate_request
from app.api.errors import as_service_error, validation_error
from app.api.generate import terminal_error
from app.api.openai_routes import ChatChunks, openai_request
from app.config import AppConfig
from app.deployments.ingress import ServeBackend
from app.errors import InvalidRequest, ServiceError
from app.protocol.events import StreamEventBuilder, response_of
from app.protocol.generation import GenerationRequest, WireReply
from app.protocol.sagellm import ChatMessage, Response, StreamEvent, StreamEventEnd
from app.protocol.sie import GenerateRequest

T = TypeVar("T")
DEFAULT_APP = "poolserve"
CONNECT_TIMEOUT_S = 60.0
Message = ChatMessage | Mapping[str, Any]


def connect(app_name: str = DEFAULT_APP, *, timeout_s: float = CONNECT_TIMEOUT_S) -> Client:
    """A client of the running Serve application `app_name` (Ray must be reachable: inside a
    Ray job or task it is; in a plain script, `ray.init()` first, with RAY_ADDRESS set, and for
    a head on 127.0.0.1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: README "Ray jobs through handles").
    The config (validated once, by the builder) and the deployment handles come from the
    application's ingress itself."""
    ingress = serve.get_app_handle(app_name)
    connection = ingress.connection.remote().result(timeout_s=timeout_s)
    config, autoscaler, generators, ledger = connection
    return Client(app_name, config, ServeBackend(config, generators, autoscaler, ledger))


class _LoopThread:
    """A private event loop in a daemon thread: the backend's snapshot refresh and streams live
    on one loop whether the caller is synchronous or on an event loop of its own."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Block until `coroutine` finishes on the loop; an interrupt cancels it there."""
        future = self.submit(coroutine)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def run_async(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Await `coroutine` from another loop; cancelling the caller cancels it there."""
        return await asyncio.wrap_future(self.submit(coroutine))

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)


async def _next(events: AsyncIterator[T]) -> T:
    return await anext(events)


class Client:
    """Generation through Serve deployment handles; results and events are sageLLM v0.1 types."""

    def __init__(self, app_name: str, config: AppConfig, backend: ServeBackend) -> None:
        self.app_name = app_name
        self.config = config
        self._backend = backend
        self._loop = _LoopThread(f"poolserve-handles-{app_name}")

    @property
    def models(self) -> list[str]:
        return [model.id for model in self.config.models]

    def close(self) -> None:
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- buffered ---------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        *,
        max_new_tokens: int,
        model: str | None = None,
        pool: str | None = None,
        profile: str | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
        **options: Any,
    ) -> Response:
        """Complete `prompt`. `options` are the fields of the SIE generate body
        (temperature, top_p, top_k, stop, seed, routing_key, prompt_cache_key, ...)."""
        request = self.generation_request(
            prompt=prompt,
            model=model,
            pool=pool,
            profile=profile,
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            **options,
        )
        return self._loop.run(self._collect(request, trace_id))

    def chat(
        self,
        messages: Sequence[Message],
        *,
        model: str | None = None,
        pool: str | None = None,
        profile: str | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
        **options: Any,
    ) -> Response:
        """Answer a conversation with the model's chat template. `options` are the fields of
        vLLM's OpenAI chat body (max_tokens, temperature, stop, seed, min_p, ...)."""
        request = self.generation_request(
            messages=messages,
            model=model,
            pool=pool,
            profile=profile,
            request_id=request_id,
            **options,
        )
        return self._loop.run(self._collect(request, trace_id))

    def messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int,
        model: str | None = None,
        pool: str | None = None,
        profile: str | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """An Anthropic Messages request, answered by vLLM's Anthropic layer as
        `POST /v1/messages` is: the Message as a dict (`content` blocks, `stop_reason`,
        `usage`). `options` are the other fields of its body (system, stop_sequences, tools,
        tool_choice, temperature, top_p, top_k, metadata). Buffered."""
        request = self.messages_request(
            messages,
            max_tokens=max_tokens,
            model=model,
            pool=pool,
            profile=profile,
            request_id=request_id,
            **options,
        )
        return self._loop.run(self._wire_body(request))

    async def amessages(
        self, messages: Sequence[Mapping[str, Any]], **kwargs: Any
    ) -> dict[str, Any]:
        """`messages` for callers on an event loop."""
        request = self.messages_request(messages, **kwargs)
        return await self._loop.run_async(self._wire_body(request))

    def messages_request(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int,
        model: str | None = None,
        pool: str | None = None,
        profile: str | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> GenerationRequest:
        """The internal request `POST /v1/messages` would build for the same body."""
        if options.get("stream"):
            raise InvalidRequest("messages() is buffered; leave out 'stream'", param="stream")
        body = {
            "model": model or self.config.models[0].id,
            "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens,
            **options,
        }
        headers = {POOL_HEADER: pool or "", PROFILE_HEADER: profile or ""}
        request = openai_request(self.config, "messages", body, headers, len(json.dumps(body)))
        return replace(request, request_id=request_id) if request_id else request

    async def agenerate(self, prompt: str, *, max_new_tokens: int, **kwargs: Any) -> Response:
        """`generate` for callers on an event loop."""
        trace_id = kwargs.pop("trace_id", None)
        request = self.generation_request(prompt=prompt, max_new_tokens=max_new_tokens, **kwargs)
        return await self._loop.run_async(self._collect(request, trace_id))

    async def achat(self, messages: Sequence[Message], **kwargs: Any) -> Response:
        """`chat` for callers on an event loop."""
        trace_id = kwargs.pop("trace_id", None)
        request = self.generation_request(messages=messages, **kwargs)
        return await self._loop.run_async(self._collect(request, trace_id))

    # -- streaming --------------------------------------------------------------------------

    def stream(self, *, trace_id: str | None = None, **kwargs: Any) -> Iterator[StreamEvent]:
        """Events of one generation (`prompt=` + `max_new_tokens=`, or `messages=`), as they
        arrive. Closing the iterator before `end` cancels the engine request."""
        request = self.generation_request(**kwargs)
        return self._sync_events(self._events(request, trace_id))

    async def astream(
        self, *, trace_id: str | None = None, **kwargs: Any
    ) -> AsyncIterator[StreamEvent]:
        """`stream` as an async iterator; `aclose()` it (or use `contextlib.aclosing`) to
        cancel early."""
        request = self.generation_request(**kwargs)
        events = self._events(request, trace_id)
        try:
            while True:
                try:
                    event = await self._loop.run_async(_next(events))
                except StopAsyncIteration:
                    return
                yield event
        finally:
            await self._loop.run_async(events.aclose())

    def _sync_events(self, events: AsyncGenerator[StreamEvent, None]) -> Iterator[StreamEvent]:
        try:
            while True:
                try:
                    event = self._loop.run(_next(events))
                except StopAsyncIteration:
                    return
                yield event
        finally:
            self._loop.run(events.aclose())

    # -- shared -----------------------------------------------------------------------------

    def generation_request(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[Message] | None = None,
        model: str | None = None,
        pool: str | None = None,
        profile: str | None = None,
        request_id: str | None = None,
        **options: Any,
    ) -> GenerationRequest:
        """The internal request HTTP would build for the same body and routing headers."""
        if (prompt is None) == (messages is None):
            raise InvalidRequest("pass exactly one of 'prompt' and 'messages'", param="prompt")
        model = model or self.config.models[0].id
        headers = {POOL_HEADER: pool or "", PROFILE_HEADER: profile or ""}
        try:
            if messages is not None:
                body = {  # vLLM's chat request, streamed (the events come from its deltas)
                    "model": model,
                    "messages": [_message(m) for m in messages],
                    **options,
                    "stream": True,
                    "return_token_ids": True,  # the events' output_tokens
                }
                size = len(json.dumps(body))  # big ones travel by reference
                request = openai_request(self.config, "chat", body, headers, size)
            else:
                generate = GenerateRequest.model_validate({"prompt": prompt, **options})
                request = generate_request(self.config, model, generate, headers)
        except ValidationError as error:
            raise validation_error(error) from None
        return replace(request, request_id=request_id) if request_id else request

    async def _events(
        self, request: GenerationRequest, trace_id: str | None
    ) -> AsyncGenerator[StreamEvent, None]:
        builder = StreamEventBuilder(
            request_id=request.request_id,
            trace_id=trace_id or request.request_id,
            engine_id=f"{self.app_name}:{request.model}",
            started_at=time.time(),
        )
        batches = cast(AsyncGenerator[Any, None], self._backend.stream(request))
        chat = ChatChunks()
        try:
            async for batch in batches:
                if batch and isinstance(batch[0], WireReply):
                    batch = [chunk for reply in batch for chunk in chat.feed(reply)]
                for event in builder.feed(batch, time.time()):
                    if isinstance(event, StreamEventEnd) and event.error is not None:
                        raise terminal_error(builder.result)
                    yield event
                if builder.ended:
                    return
            raise ServiceError("generation stream ended before a terminal event")
        except ServiceError:
            raise
        except Exception as error:  # every other failure surfaces as a typed error
            raise as_service_error(error) from error
        finally:
            await batches.aclose()

    async def _wire_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The JSON body vLLM's layer made on the worker (a buffered OpenAI-route call)."""
        batches = cast(AsyncGenerator[Any, None], self._backend.stream(request))
        data: list[bytes] = []
        try:
            async for batch in batches:
                for reply in batch:
                    if isinstance(reply, WireReply):
                        data.append(reply.data)
                        if reply.done:
                            body: dict[str, Any] = json.loads(b"".join(data))
                            return body
            raise ServiceError("generation stream ended before a terminal event")
        except ServiceError:
            raise
        except Exception as error:  # every other failure surfaces as a typed error
            raise as_service_error(error) from error
        finally:
            await batches.aclose()

    async def _collect(self, request: GenerationRequest, trace_id: str | None) -> Response:
        end: StreamEventEnd | None = None
        async for event in self._events(request, trace_id):
            if isinstance(event, StreamEventEnd):
                end = event
        assert end is not None, "_events ends with an end event or raises"
        return response_of(end)


def _message(message: Message) -> dict[str, Any]:
    if isinstance(message, ChatMessage):
        return {"role": message.role, "content": message.content}
    return dict(message)


__all__ = ["Client", "connect"]
