"""CPU cost of the metric recording one request makes in the ingress (issue 27: a request costs
little). In process, no Ray: N simulated streaming chat requests, each as the request path records
it (the middleware's observation and `record_request`, the chunk stream's `StreamWatch`: a text
batch, then the terminal stats), timed in a loop.

    .venv/bin/python benchmarks/metrics_cost.py [--requests 200000] [--repeats 5]

Run it against another checkout's `app` (e.g. a `git archive` of an older commit) with
PYTHONPATH=<that checkout> to compare before and after. Prints the best of `repeats` runs, in
microseconds of CPU (process time) per request."""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace
from typing import Any

from app import metrics
from app.protocol.generation import (
    GenerationChunk,
    GenerationRequest,
    OpenAICall,
    SamplingOptions,
    WireReply,
)

ROUTE = "/v1/chat/completions"
MODEL = "org/model"


def one_request(scope: dict[str, Any], request: GenerationRequest, error: bool) -> None:
    observation = metrics.RequestObservation(scope)
    token = metrics.CURRENT_REQUEST.set(observation)
    observe = getattr(metrics, "observe_generation", None)  # what the backend pass-through adds
    if observe is not None:
        observe(request)
    watch = metrics.StreamWatch()
    watch.batch([WireReply(b"data: {}\n\n", stream=True)])
    stats = GenerationChunk(
        "",
        done=True,
        finish_reason="stop",
        prompt_tokens=12,
        completion_tokens=16,
        ttft_ms=20.0,
        tpot_ms=5.0,
    )
    watch.batch([WireReply(b"data: {}\n\n", stream=True, done=True, stats=stats)])
    watch.close()
    metrics.CURRENT_REQUEST.reset(token)
    metrics.record_request(ROUTE, "POST", 503 if error else 200, "QUEUE_FULL" if error else None)


def run(requests: int, error_every: int) -> float:
    scope = {"route": SimpleNamespace(path=ROUTE)}
    request = GenerationRequest(
        request_id="r",
        model=MODEL,
        sampling=SamplingOptions(),
        pool="bench",
        openai=OpenAICall("chat", {}),
    )
    started = time.process_time()
    for index in range(requests):
        one_request(scope, request, error_every > 0 and index % error_every == 0)
    return (time.process_time() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--error-every", type=int, default=20, help="one error per this many")
    args = parser.parse_args()
    run(1000, args.error_every)  # warm up (label children, caches)
    best = min(run(args.requests, args.error_every) for _ in range(args.repeats))
    print(
        f"metric recording: {best:.2f} us of CPU per request ({args.requests} requests, best of"
        f" {args.repeats}; app from {metrics.__file__})"
    )
    if hasattr(metrics, "local_shard"):
        print(publication_cost())


def publication_cost(routes: int = 4, pools: int = 10, models: int = 3) -> str:
    """What a replica spends once a second to publish (its shard copied and pickled), with
    `routes` x `pools` x `models` series per family."""
    import pickle

    for r in range(routes):
        for p in range(pools):
            for m in range(models):
                key = (f"/route/{r}", f"pool-{p}", f"model-{m}")
                metrics.TIME_TO_FIRST_TOKEN.observe(key, 0.1)
                metrics.TIME_PER_OUTPUT_TOKEN.observe(key, 0.01)
                metrics.ENGINE_TIME_TO_FIRST_TOKEN.observe(key, 0.1)
                metrics.ENGINE_TIME_PER_OUTPUT_TOKEN.observe(key, 0.01)
                metrics.QUEUE_TIME.observe(key, 0.01)
                metrics.PROMPT_TOKENS.inc(key, 3)
                metrics.GENERATION_TOKENS.inc(key, 3)
                metrics.REQUESTS.inc((key[0], "POST", "200", "none", key[1], key[2]))
    rounds = 200
    started = time.process_time()
    for _ in range(rounds):
        size = len(pickle.dumps(metrics.local_shard("bench", time.time())))
    each = (time.process_time() - started) / rounds * 1000
    series = routes * pools * models
    return (
        f"publication: {each:.2f} ms of CPU per publish ({series} series per family, "
        f"{size / 1024:.0f} KiB pickled), at most one a second"
    )


if __name__ == "__main__":
    main()
