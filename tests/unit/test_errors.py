"""The error hierarchy: pickling across Ray, and rendering to both body shapes in one place."""

from __future__ import annotations

import json
import pickle

import pytest
from pydantic import ValidationError

from app import errors
from app.api.errors import error_response, format_location, parse_json_object, validation_error
from app.protocol.sie import GenerateRequest


@pytest.mark.parametrize(
    "error",
    [
        errors.InvalidRequest("bad", param="temperature"),
        errors.UnsupportedField("tools"),
        errors.ModelNotFound("org/name"),
        errors.ModelLoading("loading"),
        errors.ModelLoadFailed("gated", error_class="GATED", attempts=2),
        errors.QueueFull("full"),
        errors.GenerationFailed("parse failed", "MODEL_OUTPUT_PARSE_ERROR"),
        errors.InternalError("abc123"),
        errors.PoolNotFound("eval"),
    ],
)
def test_errors_survive_pickling(error: errors.ServiceError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert (copy.status, copy.code, copy.message, copy.param, copy.retry_after_s, copy.extra) == (
        error.status,
        error.code,
        error.message,
        error.param,
        error.retry_after_s,
        error.extra,
    )


def body(response) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(response.body)


def test_openai_shape_has_type_and_param() -> None:
    response = error_response(errors.UnsupportedField("foo"), "openai")
    assert response.status_code == 400
    assert body(response) == {
        "error": {
            "code": "unsupported_field",
            "message": "'foo' is not supported",
            "param": "foo",
            "type": "invalid_request_error",
        }
    }
    assert response.headers["x-sie-error-code"] == "unsupported_field"
    assert "retry-after" not in response.headers


def test_sie_shape_is_a_detail_object() -> None:
    response = error_response(errors.ModelNotFound("x"), "sie")
    assert response.status_code == 404
    assert body(response)["detail"]["code"] == "MODEL_NOT_FOUND"


def test_capacity_errors_carry_retry_after() -> None:
    response = error_response(errors.ModelLoading("loading"), "openai")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "5"
    assert body(response)["error"]["type"] == "server_error"


def test_model_load_failed_never_carries_retry_after() -> None:
    response = error_response(errors.ModelLoadFailed("gated", error_class="GATED"), "sie")
    assert response.status_code == 502
    assert "retry-after" not in response.headers
    assert body(response)["detail"] | {} == {
        "code": "MODEL_LOAD_FAILED",
        "message": "gated",
        "error_class": "GATED",
        "permanent": True,
        "attempts": 1,
    }


def test_unknown_exceptions_become_500_with_a_request_id_and_no_internals() -> None:
    response = error_response(RuntimeError("secret internals"), "openai")
    assert response.status_code == 500
    error = body(response)["error"]
    assert error["code"] == "internal_error"
    assert "secret" not in json.dumps(error)
    assert error["request_id"] in error["message"]


def test_unknown_field_maps_to_unsupported_field_with_param() -> None:
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate({"prompt": "x", "max_new_tokens": 1, "bogus": 1})
    error = validation_error(caught.value)
    assert (error.code, error.param) == ("unsupported_field", "bogus")


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"temperature": "1"}, "temperature"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"prompt": 5}, "prompt"),
        ({"stop": [""]}, "stop[0]"),
        ({"stop": 3}, "stop"),
        ({"grammar": {"regex": 1}}, "grammar.regex"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_wrong_types_and_ranges_name_the_parameter(payload: dict, param: str) -> None:
    request = {"prompt": "x", "max_new_tokens": 1, **payload}
    with pytest.raises(ValidationError) as caught:
        GenerateRequest.model_validate(request)
    error = validation_error(caught.value)
    assert (error.status, error.code, error.param) == (400, "invalid_request", param)


def test_format_location_drops_union_tags() -> None:
    assert (
        format_location(("messages", 0, "content", "list[ContentPart]", 1, "type"))
        == "messages[0].content[1].type"
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"{bad",
        b"\xff\xfe",
        b"[1, 2]",
        b'{"a": NaN}',
        b"",
        b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_bad_bodies_are_invalid_requests(raw: bytes) -> None:
    with pytest.raises(errors.InvalidRequest):
        parse_json_object(raw)


INTERNAL = "EngineDeadError: /usr/lib/python3.11/site-packages/vllm/v1/engine/core.py line 42"


def test_a_server_side_engine_failure_reaches_the_client_without_its_internals() -> None:
    """vLLM's in-band error events and error responses carry the exception's text; the client
    gets the request id (to find it in the log), never the text."""
    from types import SimpleNamespace

    from app.engine.openai_frontend import _service_error, public_event

    event = "data: " + json.dumps({"error": {"message": INTERNAL, "code": 500}}) + "\n\n"
    public = public_event(event, "req-1")
    assert "/usr/lib" not in public and "EngineDeadError" not in public
    assert "req-1" in public and json.loads(public[len("data: ") :])["error"]["code"] == 500
    bad_request = "data: " + json.dumps({"error": {"message": "bad n", "code": 400}}) + "\n\n"
    assert public_event(bad_request, "req-1") == bad_request
    token = 'data: {"choices": [{"delta": {"content": "/usr/lib"}}]}\n\n'
    assert public_event(token, "req-1") == token
    for status in (500, 503):
        response = SimpleNamespace(error=SimpleNamespace(code=status, message=INTERNAL, param=None))
        error = _service_error(response, "org/m", "req-2")
        assert error.status >= 500 and "req-2" in error.message
        assert "/usr/lib" not in error.message and "EngineDeadError" not in error.message


def test_a_failed_load_is_refused_without_the_exception_text() -> None:
    from app.config import AppConfig
    from app.protocol.generation import GenerationRequest, SamplingOptions
    from app.protocol.workers import ModelStatus, WorkerStatus
    from app.routing.targets import choose_target

    failed = WorkerStatus(
        "w1", "Generator-cpu", "cpu", "n", "default", (ModelStatus("org/m", "failed", INTERNAL),), 0
    )
    config = AppConfig.model_validate({"models": [{"id": "org/m"}]})
    with pytest.raises(errors.ModelLoadFailed) as refusal:
        choose_target(config, [failed], GenerationRequest("r", "org/m", SamplingOptions()), 0.0)
    assert "/usr/lib" not in refusal.value.message and "w1" not in refusal.value.message
