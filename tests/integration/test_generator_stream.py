"""The Generator deployment through Serve streaming handles, on a real local Ray cluster:
coalescing into few Ray objects, cancellation freeing the engine request, and the same chunk
contract for the fake engine and the real vLLM engine (so the fake cannot drift)."""

from __future__ import annotations

import uuid

import pytest

from app.protocol.generation import GenerationChunk, GenerationRequest, SamplingOptions
from tests.conftest import FAKE_MODEL, REAL_MODEL, Stack

pytestmark = pytest.mark.integration

ENGINES = [
    pytest.param(("fake", FAKE_MODEL), id="fake"),
    pytest.param(("poolserve", REAL_MODEL), id="vllm"),
]


def request(model: str, max_new_tokens: int | None, **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        model=model,
        prompt="The quick brown fox",
        sampling=SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0, **sampling),  # type: ignore[arg-type]
    )


def stream(stack: Stack, app: str, generation: GenerationRequest) -> list[list[GenerationChunk]]:
    handle = stack.handle("Generator-cpu", app).options(stream=True)
    return list(handle.generate.remote(generation))


@pytest.mark.parametrize("engine", ENGINES)
def test_chunk_contract(stack: Stack, engine: tuple[str, str]) -> None:
    app, model = engine
    chunks = [
        chunk
        for batch in stream(stack, app, request(model, 12, ignore_eos=True))
        for chunk in batch
    ]
    terminals = [chunk for chunk in chunks if chunk.done]
    assert len(terminals) == 1 and chunks[-1].done
    terminal = chunks[-1]
    assert terminal.finish_reason == "length"
    assert terminal.completion_tokens == 12
    assert terminal.prompt_tokens and terminal.prompt_tokens > 0
    assert terminal.ttft_ms is not None and terminal.ttft_ms >= 0
    first_text = [chunk for chunk in chunks if chunk.text_delta]
    assert first_text and first_text[0].is_first
    assert sum(chunk.is_first for chunk in chunks) == 1
    assert "".join(chunk.text_delta for chunk in chunks).strip()


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_string_is_honoured_and_not_emitted(stack: Stack, engine: tuple[str, str]) -> None:
    app, model = engine
    free = "".join(
        c.text_delta for b in stream(stack, app, request(model, 16, ignore_eos=True)) for c in b
    )
    words = free.split()
    assert len(words) >= 3, free
    stop = words[2]
    chunks = [
        c for b in stream(stack, app, request(model, 16, stop=(stop,), ignore_eos=True)) for c in b
    ]
    text = "".join(chunk.text_delta for chunk in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert stop not in text
    assert free.startswith(text)


@pytest.mark.parametrize("engine", ENGINES)
def test_over_long_requests_are_refused_before_streaming(
    stack: Stack, engine: tuple[str, str]
) -> None:
    from app.errors import InputTooLong

    app, model = engine
    with pytest.raises(InputTooLong):
        stream(stack, app, request(model, 1_000_000))


def test_cancelling_the_stream_aborts_the_engine_request(stack: Stack) -> None:
    """400 tokens take ~30 s here; after cancel the engine must be idle within seconds."""
    app, model = "poolserve", REAL_MODEL
    handle = stack.handle("Generator-cpu", app).options(stream=True)
    response = handle.generate.remote(request(model, 400, ignore_eos=True))
    first = next(iter(response))
    assert first
    response.cancel()
    assert stack.wait_idle(app, model, timeout_s=10)


def test_fast_tokens_are_coalesced_into_few_ray_objects(stack: Stack) -> None:
    batches = stream(stack, "fake", request(FAKE_MODEL, 400))
    chunks = [chunk for batch in batches for chunk in batch]
    assert chunks[-1].completion_tokens == 400
    assert len(batches) < 100, f"{len(batches)} Ray objects for 400 tokens"
