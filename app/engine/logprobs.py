"""vLLM's per-token logprobs as OpenAI's `ChatCompletionTokenLogprob` entries (SIE generation)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def token_logprobs(
    token_ids: Sequence[int], entries: Sequence[dict[int, Any]], top_n: int
) -> tuple[dict[str, Any], ...]:
    """vLLM per-token logprob dicts -> OpenAI `ChatCompletionTokenLogprob` entries."""
    result = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(token_id)
        ranked = sorted(entry.items(), key=lambda item: item[1].rank or 0)
        tops = [item for item in ranked if (item[1].rank or 0) >= 1][:top_n]
        result.append(
            {
                **_logprob_entry(
                    chosen.decoded_token if chosen else "", chosen.logprob if chosen else 0.0
                ),
                "top_logprobs": [
                    _logprob_entry(lp.decoded_token or "", lp.logprob) for _, lp in tops
                ],
            }
        )
    return tuple(result)


def _logprob_entry(token: str | None, logprob: float) -> dict[str, Any]:
    text = token or ""
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}
