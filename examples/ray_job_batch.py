"""Batch generation as a Ray job: fan prompts out over Ray tasks that call the running Serve app
through `app.handles` (same routing and admission as HTTP), write one JSON line per prompt.

    ray job submit --working-dir examples -- \\
        python ray_job_batch.py --output /tmp/poolserve-batch.jsonl --num-prompts 32

Prompts come from --prompts-file (one per line) or are generated (--num-prompts). Each output
line: index, prompt, text, finish_reason, token counts, ttft_ms, tpot_ms, or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import ray  # noqa: TID251 - a Ray job is a Ray driver; it reaches Serve only through app.handles

SUBJECTS = ("France", "Italy", "Spain", "Germany", "Japan", "Canada", "Egypt", "Peru")
MAX_ATTEMPTS = 5


def generated_prompts(count: int) -> list[str]:
    return [
        f"In one sentence, what is the capital of {SUBJECTS[i % len(SUBJECTS)]}? ({i})"
        for i in range(count)
    ]


@ray.remote(num_cpus=0)
def run_shard(
    app_name: str, shard: list[tuple[int, str]], max_tokens: int, concurrency: int
) -> list[dict[str, Any]]:
    """One task: its prompts through one client, `concurrency` requests in flight at a time."""
    from app.errors import CapacityError, ServiceError
    from app.handles import connect

    client = connect(app_name)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(index: int, prompt: str) -> dict[str, Any]:
        record: dict[str, Any] = {"index": index, "prompt": prompt}
        async with semaphore:
            for attempt in range(1, MAX_ATTEMPTS + 1):
                try:
                    response = await client.achat(
                        [{"role": "user", "content": prompt}],
                        max_tokens=max_tokens,
                        temperature=0,
                        trace_id=f"batch-{index}",
                    )
                except CapacityError as error:  # provisioning, loading, queue full: retry
                    if attempt == MAX_ATTEMPTS:
                        return {**record, "error": {"code": error.code, "message": error.message}}
                    await asyncio.sleep(error.retry_after_s or 1.0)
                    continue
                except ServiceError as error:
                    return {**record, "error": {"code": error.code, "message": error.message}}
                return {
                    **record,
                    "text": response.output_text,
                    "finish_reason": response.finish_reason,
                    "prompt_tokens": response.prompt_tokens,
                    "completion_tokens": len(response.output_tokens),
                    "ttft_ms": round(response.metrics.ttft_ms, 2),
                    "tpot_ms": round(response.metrics.tpot_ms, 2),
                    "request_id": response.request_id,
                }
        raise AssertionError("unreachable")

    async def all_of_shard() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(one(index, prompt) for index, prompt in shard)))

    try:
        return asyncio.run(all_of_shard())
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSONL file to write (on the driver).")
    parser.add_argument("--app-name", default="poolserve", help="Serve application name.")
    parser.add_argument("--prompts-file", help="One prompt per line (default: generated).")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--tasks", type=int, default=4, help="Ray tasks to fan out over.")
    parser.add_argument("--concurrency", type=int, default=4, help="Requests in flight per task.")
    args = parser.parse_args()

    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = generated_prompts(args.num_prompts)
    indexed = list(enumerate(prompts))
    shards = [indexed[i :: args.tasks] for i in range(args.tasks) if indexed[i :: args.tasks]]

    ray.init()
    started = time.monotonic()
    results = [
        record
        for shard_records in ray.get(
            [
                run_shard.remote(args.app_name, shard, args.max_tokens, args.concurrency)
                for shard in shards
            ]
        )
        for record in shard_records
    ]
    elapsed = time.monotonic() - started
    results.sort(key=lambda record: record["index"])

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w") as sink:
        for record in results:
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
    failed = sum("error" in record for record in results)
    tokens = sum(record.get("completion_tokens", 0) for record in results)
    print(
        f"{len(results)} prompts over {len(shards)} tasks in {elapsed:.1f} s "
        f"({tokens / elapsed:.1f} tok/s), {failed} failed -> {output}",
        flush=True,
    )
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
