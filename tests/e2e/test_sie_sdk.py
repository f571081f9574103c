"""Conformance with the real, unmodified `sie-sdk` 0.10.1 client (contract §1, §2, §6), sync
`SIEClient` and async `SIEAsyncClient`, against the running app with the real model.

Client code runs in the sie-sdk venv through `tests/sie.py`; each snippet groups many calls so
the file costs a handful of subprocesses: one per client flavour for the happy paths and one
for all typed errors (the three run at once), one per early-break case."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest

from tests.conftest import REAL_MODEL, Stack
from tests.sie import SIEFailure, SIERunner

pytestmark = pytest.mark.e2e

FLAVOURS = ("sync", "async")
UNKNOWN_MODEL = "no-such-org/no-such-model"
# ~3000 tokens: over the 2048-token context of the test model.
LONG_PROMPT = "hello " * 3000
INJECT = {"MODEL": REAL_MODEL, "UNKNOWN": UNKNOWN_MODEL, "LONG_PROMPT": LONG_PROMPT}


@pytest.fixture(scope="module")
def sie(stack: Stack) -> SIERunner:
    return SIERunner(stack.base_url)


# ---------------------------------------------------------------------------------------------
# Happy paths: every call of the scope once per client flavour, in one subprocess each.

SURFACE_SYNC = """
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = {}
    out["generate"] = client.generate(
        MODEL, "The capital of France is", max_new_tokens=8, temperature=0
    )
    out["stream_generate"] = list(
        client.stream_generate(MODEL, "Once upon a time", max_new_tokens=12, temperature=0)
    )
    out["chat_completions"] = client.chat_completions(
        MODEL, question, max_tokens=32, temperature=0
    )
    out["stream_chat_completions"] = list(
        client.stream_chat_completions(
            MODEL, question, max_tokens=32, temperature=0,
            stream_options={"include_usage": True},
        )
    )
    out["responses"] = client.responses(
        MODEL, "What is the capital of France?", max_output_tokens=32, temperature=0
    )
    out["list_models"] = client.list_models()
    out["get_model"] = client.get_model(MODEL)
    out["get_capacity"] = client.get_capacity()
    out["get_capacity_cpu"] = client.get_capacity(gpu="CPU")
    out["get_capacity_l4"] = client.get_capacity(gpu="l4")
    out["wait_for_capacity"] = client.wait_for_capacity(gpu="cpu", timeout_s=30)
    out["last_retry_count"] = client.last_retry_count
    return out
"""

SURFACE_ASYNC = """
    question = [{"role": "user", "content": "What is the capital of France?"}]
    out = {}
    out["generate"] = await aclient.generate(
        MODEL, "The capital of France is", max_new_tokens=8, temperature=0
    )
    out["stream_generate"] = await alist(
        aclient.stream_generate(MODEL, "Once upon a time", max_new_tokens=12, temperature=0)
    )
    out["chat_completions"] = await aclient.chat_completions(
        MODEL, question, max_tokens=32, temperature=0
    )
    out["stream_chat_completions"] = await alist(
        aclient.stream_chat_completions(
            MODEL, question, max_tokens=32, temperature=0,
            stream_options={"include_usage": True},
        )
    )
    out["responses"] = await aclient.responses(
        MODEL, "What is the capital of France?", max_output_tokens=32, temperature=0
    )
    out["list_models"] = await aclient.list_models()
    out["get_model"] = await aclient.get_model(MODEL)
    out["get_capacity"] = await aclient.get_capacity()
    out["get_capacity_cpu"] = await aclient.get_capacity(gpu="CPU")
    out["get_capacity_l4"] = await aclient.get_capacity(gpu="l4")
    out["wait_for_capacity"] = await aclient.wait_for_capacity(gpu="cpu", timeout_s=30)
    out["last_retry_count"] = aclient.last_retry_count
    return out
"""


@pytest.fixture(scope="module")
def snippets(sie: SIERunner) -> dict[str, Any]:
    """The sync and async happy paths and all typed errors, run concurrently (the engine
    batches them); each result also records what the SDK printed (its log warnings)."""
    codes = {"sync": SURFACE_SYNC, "async": SURFACE_ASYNC, "errors": ERRORS}
    results: dict[str, Any] = {}
    # generous timeouts: the default run shares 2 cores with Ray and the engine
    with contextlib.ExitStack() as running:
        clients = {
            name: running.enter_context(sie.start(code, timeout_s=600, inject=INJECT))
            for name, code in codes.items()
        }
        for name, client in clients.items():
            results[name] = client.result()
            results[name]["sdk_output"] = client.output()
    return results


@pytest.fixture(params=FLAVOURS)
def surface(request: pytest.FixtureRequest, snippets: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = snippets[request.param]
    return result


@pytest.mark.parametrize("name", ["sync", "async", "errors"])
def test_the_sdk_has_nothing_to_complain_about(snippets: dict[str, Any], name: str) -> None:
    # The SDK logs e.g. a server-version skew (X-SIE-Server-Version) or unclosed sessions.
    assert snippets[name]["sdk_output"] == ""


def test_generate(surface: dict[str, Any]) -> None:
    result = surface["generate"]
    assert result["model"] == REAL_MODEL
    assert isinstance(result["text"], str) and result["text"].strip()
    assert result["finish_reason"] in ("stop", "length")
    usage = result["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result["ttft_ms"] >= 0
    assert result["request"]["id"]  # X-SIE-Request-ID


def test_stream_generate(surface: dict[str, Any]) -> None:
    chunks = surface["stream_generate"]
    assert len(chunks) >= 2, chunks
    assert [chunk["seq"] for chunk in chunks] == list(range(len(chunks)))
    assert len({chunk["request_id"] for chunk in chunks}) == 1
    *deltas, terminal = chunks
    assert all(chunk["done"] is False and "usage" not in chunk for chunk in deltas)
    assert "".join(chunk["text_delta"] for chunk in deltas).strip()
    assert terminal["done"] is True and terminal["text_delta"] == ""
    assert terminal["finish_reason"] in ("stop", "length")
    usage = terminal["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert terminal["ttft_ms"] >= 0


def test_chat_completions(surface: dict[str, Any]) -> None:
    completion = surface["chat_completions"]
    assert completion["object"] == "chat.completion" and completion["model"] == REAL_MODEL
    assert completion["id"] and isinstance(completion["created"], int)
    (choice,) = completion["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert "Paris" in choice["message"]["content"]
    assert choice["finish_reason"] == "stop"
    usage = completion["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert completion["request"]["id"]


def test_stream_chat_completions_with_usage(surface: dict[str, Any]) -> None:
    chunks = surface["stream_chat_completions"]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["model"] == REAL_MODEL and "error" not in chunk for chunk in chunks)
    *with_choices, usage_chunk = chunks
    assert with_choices and all(len(chunk["choices"]) == 1 for chunk in with_choices)
    assert with_choices[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in with_choices]
    assert finishes[-1] == "stop" and all(reason is None for reason in finishes[:-1])
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in with_choices)
    assert "Paris" in text
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_responses(surface: dict[str, Any]) -> None:
    response = surface["responses"]
    assert response["object"] == "response" and response["model"] == REAL_MODEL
    assert response["id"] and response["status"] == "completed"
    (message,) = response["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    (part,) = message["content"]
    assert part["type"] == "output_text" and "Paris" in part["text"]
    usage = response["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_list_and_get_model(surface: dict[str, Any]) -> None:
    (listed,) = surface["list_models"]
    assert listed["name"] == REAL_MODEL and listed["loaded"] is True
    assert listed["state"] == "loaded" and "tokens" in listed["outputs"]
    model = surface["get_model"]  # GET /v1/models/HuggingFaceTB/SmolLM2-135M-Instruct
    assert model["name"] == model["id"] == REAL_MODEL
    assert model["loaded"] is True and model["state"] == "loaded"
    assert model["capabilities"]["streaming"] is True


def test_model_capabilities_match_what_the_api_accepts(surface: dict[str, Any]) -> None:
    capabilities = surface["get_model"]["capabilities"]
    assert sorted(capabilities["grammar"]) == ["ebnf", "json_schema", "regex"]
    assert capabilities["tools"] is True


def test_capacity(surface: dict[str, Any]) -> None:
    capacity = surface["get_capacity"]  # the SDK itself insists on "type": "gateway"
    assert capacity["status"] == "healthy"
    assert capacity["worker_count"] >= 1 and capacity["models_loaded"] >= 1
    assert "cpu" in capacity["configured_gpu_types"] and "cpu" in capacity["live_gpu_types"]
    assert capacity["workers"] and all(w["gpu"] == "cpu" for w in capacity["workers"])
    worker = capacity["workers"][0]
    assert worker["healthy"] is True and REAL_MODEL in worker["loaded_models"]
    filtered = surface["get_capacity_cpu"]  # the filter is case-insensitive
    assert filtered["worker_count"] == capacity["worker_count"]
    assert surface["get_capacity_l4"]["worker_count"] == 0
    assert surface["get_capacity_l4"]["workers"] == []
    assert surface["wait_for_capacity"]["worker_count"] >= 1
    assert surface["last_retry_count"] == 0


# ---------------------------------------------------------------------------------------------
# Typed errors: all of them, both flavours, in one subprocess.

ERRORS = """
    hi = [{"role": "user", "content": "hi"}]
    long = [{"role": "user", "content": LONG_PROMPT}]
    bogus = {"bogus_field": 1}
    sync = {
        "generate/unknown-model": catch(client.generate, UNKNOWN, "x", max_new_tokens=1),
        "stream_generate/unknown-model": catch(
            lambda: list(client.stream_generate(UNKNOWN, "x", max_new_tokens=1))),
        "chat_completions/unknown-model": catch(
            client.chat_completions, UNKNOWN, hi, max_tokens=1),
        "stream_chat_completions/unknown-model": catch(
            lambda: list(client.stream_chat_completions(UNKNOWN, hi, max_tokens=1))),
        "get_model/unknown-model": catch(client.get_model, UNKNOWN),
        "chat_completions/unknown-field": catch(
            client.chat_completions, MODEL, hi, max_tokens=1, extra_body=bogus),
        "stream_chat_completions/unknown-field": catch(
            lambda: list(client.stream_chat_completions(
                MODEL, hi, max_tokens=1, extra_body=bogus))),
        "stream_generate/unknown-field": catch(
            lambda: list(client.stream_generate(MODEL, "x", max_new_tokens=1, extra_body=bogus))),
        "generate/too-long": catch(client.generate, MODEL, LONG_PROMPT, max_new_tokens=1),
        "stream_generate/too-long": catch(
            lambda: list(client.stream_generate(MODEL, LONG_PROMPT, max_new_tokens=1))),
        "chat_completions/too-long": catch(client.chat_completions, MODEL, long, max_tokens=1),
        "stream_chat_completions/too-long": catch(
            lambda: list(client.stream_chat_completions(MODEL, long, max_tokens=1))),
    }
    asynchronous = {
        "generate/unknown-model": await acatch(
            aclient.generate(UNKNOWN, "x", max_new_tokens=1)),
        "stream_generate/unknown-model": await acatch(
            alist(aclient.stream_generate(UNKNOWN, "x", max_new_tokens=1))),
        "chat_completions/unknown-model": await acatch(
            aclient.chat_completions(UNKNOWN, hi, max_tokens=1)),
        "stream_chat_completions/unknown-model": await acatch(
            alist(aclient.stream_chat_completions(UNKNOWN, hi, max_tokens=1))),
        "get_model/unknown-model": await acatch(aclient.get_model(UNKNOWN)),
        "chat_completions/unknown-field": await acatch(
            aclient.chat_completions(MODEL, hi, max_tokens=1, extra_body=bogus)),
        "stream_chat_completions/unknown-field": await acatch(
            alist(aclient.stream_chat_completions(MODEL, hi, max_tokens=1, extra_body=bogus))),
        "stream_generate/unknown-field": await acatch(
            alist(aclient.stream_generate(MODEL, "x", max_new_tokens=1, extra_body=bogus))),
        "generate/too-long": await acatch(
            aclient.generate(MODEL, LONG_PROMPT, max_new_tokens=1)),
        "stream_generate/too-long": await acatch(
            alist(aclient.stream_generate(MODEL, LONG_PROMPT, max_new_tokens=1))),
        "chat_completions/too-long": await acatch(
            aclient.chat_completions(MODEL, long, max_tokens=1)),
        "stream_chat_completions/too-long": await acatch(
            alist(aclient.stream_chat_completions(MODEL, long, max_tokens=1))),
    }
    return {"sync": sync, "async": asynchronous}
"""

# case -> (exception class, HTTP status, code, param)
EXPECTED_ERRORS: dict[str, tuple[str, int, str, str | None]] = {
    "generate/unknown-model": ("RequestError", 404, "MODEL_NOT_FOUND", None),
    "stream_generate/unknown-model": ("RequestError", 404, "MODEL_NOT_FOUND", None),
    "chat_completions/unknown-model": ("RequestError", 404, "MODEL_NOT_FOUND", None),
    "stream_chat_completions/unknown-model": ("RequestError", 404, "MODEL_NOT_FOUND", None),
    "get_model/unknown-model": ("RequestError", 404, "MODEL_NOT_FOUND", None),
    "chat_completions/unknown-field": ("RequestError", 400, "unsupported_field", "bogus_field"),
    "stream_chat_completions/unknown-field": (
        "RequestError",
        400,
        "unsupported_field",
        "bogus_field",
    ),
    "stream_generate/unknown-field": ("RequestError", 400, "unsupported_field", "bogus_field"),
    "generate/too-long": ("InputTooLongError", 400, "INPUT_TOO_LONG", None),
    "stream_generate/too-long": ("InputTooLongError", 400, "INPUT_TOO_LONG", None),
    "chat_completions/too-long": ("InputTooLongError", 400, "INPUT_TOO_LONG", None),
    "stream_chat_completions/too-long": ("InputTooLongError", 400, "INPUT_TOO_LONG", None),
}


@pytest.fixture
def errors(snippets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = snippets["errors"]
    return result


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("case", sorted(EXPECTED_ERRORS))
def test_typed_error(errors: dict[str, dict[str, Any]], flavour: str, case: str) -> None:
    error = errors[flavour][case]
    kind, status, code, param = EXPECTED_ERRORS[case]
    assert error["type"] == kind, error
    assert "RequestError" in error["types"], error
    assert error["status_code"] == status, error
    assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    assert error["message"], error


def test_an_escaping_sdk_error_is_raised_typed_in_pytest(sie: SIERunner) -> None:
    with pytest.raises(SIEFailure) as caught:
        sie.run("return await aclient.get_model(UNKNOWN)", inject=INJECT)
    assert caught.value.type == "RequestError" and caught.value.is_a("SIEError")
    assert (caught.value.status_code, caught.value.code) == (404, "MODEL_NOT_FOUND")


# ---------------------------------------------------------------------------------------------
# Early break of a stream: the server must abort the engine request.

COUNTING_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
COUNTING_CHAT = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]
BREAKS = {
    "sync-stream_generate": """
        for chunk in client.stream_generate(
            MODEL, COUNTING_PROMPT, max_new_tokens=1500, temperature=0
        ):
            await checkpoint("live")
            break
        await checkpoint("closed")
        return chunk
    """,
    "sync-stream_chat_completions": """
        for chunk in client.stream_chat_completions(
            MODEL, COUNTING_CHAT, max_tokens=1500, temperature=0
        ):
            await checkpoint("live")
            break
        await checkpoint("closed")
        return chunk
    """,
    "async-stream_generate": """
        async for chunk in aclient.stream_generate(
            MODEL, COUNTING_PROMPT, max_new_tokens=1500, temperature=0
        ):
            await checkpoint("live")
            break
        await checkpoint("closed")
        return chunk
    """,
    "async-stream_chat_completions": """
        async for chunk in aclient.stream_chat_completions(
            MODEL, COUNTING_CHAT, max_tokens=1500, temperature=0
        ):
            await checkpoint("live")
            break
        await checkpoint("closed")
        return chunk
    """,
}


def running_requests(stack: Stack) -> int:
    count: int = stack.worker_status().model_state(REAL_MODEL).stats.running_requests
    return count


@pytest.mark.parametrize("case", list(BREAKS))
def test_early_break_aborts_the_engine_request(sie: SIERunner, stack: Stack, case: str) -> None:
    inject = {**INJECT, "COUNTING_PROMPT": COUNTING_PROMPT, "COUNTING_CHAT": COUNTING_CHAT}
    with sie.start(BREAKS[case], timeout_s=300, inject=inject) as client:
        client.wait_reached("live")
        busy = running_requests(stack)
        client.release("live")
        client.wait_reached("closed")
        deadline = time.monotonic() + 5
        while (left := running_requests(stack)) and time.monotonic() < deadline:
            time.sleep(0.1)
        client.release("closed")
        first = client.result()
    assert busy == 1, f"the engine was not running the request while the client read it: {busy}"
    assert left == 0, f"{left} engine request(s) still running 5 s after the client broke off"
    assert "error" not in first, first
