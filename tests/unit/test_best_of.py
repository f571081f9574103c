"""SIE's `best_of` over vLLM's OpenAI layer (vLLM 0.32 has none): the plan and the ranking."""

from __future__ import annotations

from typing import Any

import pytest

from app.engine.openai_frontend import best_of_plan, keep_best
from app.errors import InvalidRequest


def test_plan_asks_vllm_for_every_candidate_with_logprobs() -> None:
    body: dict[str, Any] = {"n": 2, "best_of": 4}
    assert best_of_plan("chat", body) == (2, False)
    assert body == {"n": 4, "logprobs": True}
    completion: dict[str, Any] = {"best_of": 3, "logprobs": 2}
    assert best_of_plan("completion", completion) == (1, True)
    assert completion == {"n": 3, "logprobs": 2}


@pytest.mark.parametrize(
    "body",
    [
        {"best_of": 0},
        {"best_of": 129},
        {"best_of": True},
        {"n": 3, "best_of": 2},
        {"best_of": 2, "stream": True},
    ],
)
def test_plan_refuses_what_the_contract_refuses(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest) as caught:
        best_of_plan("chat", body)
    assert caught.value.param == "best_of"


def test_nothing_to_rank_leaves_the_body_to_vllm() -> None:
    body: dict[str, Any] = {"n": 2, "best_of": 2}
    assert best_of_plan("chat", body) is None and body == {"n": 2}
    assert best_of_plan("responses", {"best_of": 3}) is None


def chat_choice(index: int, *logprobs: float) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"content": str(index)},
        "logprobs": {"content": [{"logprob": value} for value in logprobs]},
    }


def test_keep_best_ranks_by_cumulative_logprob_and_renumbers() -> None:
    payload = {
        "choices": [chat_choice(0, -3.0), chat_choice(1, -0.5, -0.5), chat_choice(2, -2.5)],
        "usage": {"completion_tokens": 4},
    }
    kept = keep_best(payload, 2, expose_logprobs=False)
    assert [c["message"]["content"] for c in kept["choices"]] == ["1", "2"]
    assert [c["index"] for c in kept["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in kept["choices"])
    assert kept["usage"] == {"completion_tokens": 4}  # every candidate generated counts


def test_keep_best_reads_completion_logprobs() -> None:
    choices = [
        {"index": 0, "text": "a", "logprobs": {"token_logprobs": [-4.0]}},
        {"index": 1, "text": "b", "logprobs": {"token_logprobs": [-1.0, None]}},
    ]
    kept = keep_best({"choices": choices}, 1, expose_logprobs=True)
    assert kept["choices"] == [
        {"index": 0, "text": "b", "logprobs": {"token_logprobs": [-1.0, None]}}
    ]
