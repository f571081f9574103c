"""The load compare.py puts on each system: vLLM's serving benchmark (`vllm bench serve`, in this
process) over the workloads, one start of a system with its passes, the null-engine variant, and
the optional py-spy profile of an extra, unreported run."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from app.engine.default_model import default_model_dir
from app.history import percentile
from benchmarks.hosts import (
    MODEL_ID,
    NULL_MODEL_ID,
    SYSTEMS,
    Host,
    beside,
    client_priority,
    log,
    run_queue_seconds,
    running,
)
from benchmarks.report import RunRecord


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    num_prompts: int
    input_len: int
    output_len: int
    prefix_len: int = 0
    seed: int = 0


def bench_argv(base_url: str, model: str, workload: Workload) -> list[str]:
    argv = [
        "--backend=openai-chat",
        f"--base-url={base_url}",
        "--endpoint=/v1/chat/completions",
        f"--model={model}",
        f"--tokenizer={default_model_dir()}",
        "--dataset-name=random",
        f"--random-input-len={workload.input_len}",
        f"--random-output-len={workload.output_len}",
        f"--random-prefix-len={workload.prefix_len}",
        f"--num-prompts={workload.num_prompts}",
        f"--max-concurrency={workload.concurrency}",
        f"--seed={workload.seed}",
        "--temperature=0",
        "--percentile-metrics=ttft,tpot,itl,e2el",
        "--metric-percentiles=50,99",
        "--disable-tqdm",
    ]
    return argv


def run_bench(base_url: str, model: str, workload: Workload, log_file: Path) -> dict[str, Any]:
    from vllm.benchmarks import serve as vllm_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()  # type: ignore[no-untyped-call]
    vllm_bench.add_cli_args(parser)
    args = parser.parse_args(bench_argv(base_url, model, workload))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result: dict[str, Any] = asyncio.run(vllm_bench.main_async(args))
    with log_file.open("a") as handle:
        handle.write(f"\n===== {base_url} {workload}\n{out.getvalue()}")
    errors = [error for error in result.get("errors", []) if error]
    return {
        "output_tok_s": float(result["output_throughput"]),
        "ttft_p50_ms": float(result["median_ttft_ms"]),
        "ttft_p99_ms": float(result["p99_ttft_ms"]),
        "tpot_p50_ms": float(result["median_tpot_ms"]),
        "completed": int(result["completed"]),
        "errors": workload.num_prompts - int(result["completed"]),
        "output_tokens": int(result["total_output_tokens"]),
        "duration_s": float(result["duration"]),
        "first_error": (errors[0].strip().splitlines() or [""])[-1][:200] if errors else "",
    }


def workloads(args: argparse.Namespace) -> list[Workload]:
    items = [
        Workload(
            f"random c={c}",
            c,
            max(args.num_prompts, c),
            args.input_len,
            args.output_len,
            seed=100 + c,
        )
        for c in args.concurrency
    ]
    if args.prefix_len > 0:
        c = args.prefix_concurrency
        items.append(
            Workload(
                f"prefix {args.prefix_len}+{args.input_len} c={c}",
                c,
                max(args.num_prompts, c),
                args.input_len,
                args.output_len,
                prefix_len=args.prefix_len,
                seed=200 + c,
            )
        )
    return items


# ---------------------------------------------------------------------------------------------
# Profiling (optional): py-spy on the serving processes during one extra, unreported run.


def profile_run(
    host: Host,
    workload: Workload,
    out_dir: Path,
    seconds: int,
    log_file: Path,
    model: str = MODEL_ID,
) -> dict[str, list[tuple[str, float, float]]]:
    pyspy = Path(sys.executable).parent / "py-spy"
    targets = {role: pid for role, pid in host.replica_pids().items() if role != "EngineCore"}
    recorders = {}
    for role, pid in targets.items():
        path = out_dir / f"{host.system}-{role}.txt"
        recorders[role] = (
            subprocess.Popen(
                [
                    str(pyspy),
                    "record",
                    "--pid",
                    str(pid),
                    "--duration",
                    str(seconds),
                    "--rate",
                    "50",
                    "--gil",
                    "--format",
                    "raw",
                    "--nonblocking",
                    "--output",
                    str(path),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            path,
        )
    log(f"py-spy on {', '.join(f'{r}={p}' for r, p in targets.items())} for {seconds} s")
    before = cpu_seconds(host.pids())
    started = time.monotonic()
    run_bench(host.base_url, model, workload, log_file)
    elapsed = time.monotonic() - started
    used: dict[str, float] = {}
    for pid, (name, cpu) in cpu_seconds(host.pids()).items():
        used[name] = used.get(name, 0.0) + cpu - before.get(pid, (name, 0.0))[1]
    summaries: dict[str, list[tuple[str, float, float]]] = {
        f"CPU time per process during the run ({elapsed:.0f} s wall, "
        f"{sum(used.values()):.0f} CPU s)": [
            (name, seconds, 100 * seconds / max(elapsed, 1e-9))
            for name, seconds in sorted(used.items(), key=lambda item: -item[1])
            if seconds >= 0.05
        ]
    }
    for role, (recorder, path) in recorders.items():
        try:
            recorder.wait(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            recorder.kill()
        rows = summarize_profile(path) if path.exists() else []
        if rows:  # an idle process (Serve's fallback proxy under direct ingress) has none
            summaries[role] = rows
    return summaries


GENERIC_FRAMES = (
    "Thread.run",
    "Thread._bootstrap",
    "_run_user_code_event_loop",
    "_WorkItem.run",
    "main_loop",
    "<module>",
    "_run_once",
    "run_forever",
    "Handle._run",
    "Runner.run",
    "_run_router_event_loop",
    "run_until_complete",
    "asyncio_run",
    "Context.run",
    "_worker (concurrent",
)


def cpu_seconds(pids: list[int]) -> dict[int, tuple[str, float]]:
    """pid -> (process name, user + system CPU seconds so far). Names: Ray's proctitle
    (`ray::ServeReplica:app:Ingress` -> `Ingress`), vLLM's (`VLLM::EngineCore`), else the
    program."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        argv0 = cmdline[0].decode(errors="replace").strip()
        if argv0.startswith("ray::"):
            name = argv0.split(":")[-1].split(".")[0] or argv0  # less the running method
        elif argv0.startswith("VLLM::") or " " in argv0:
            name = argv0.split()[0]
        else:
            program = Path(argv0).name
            script = next(
                (a.decode(errors="replace") for a in cmdline[1:] if a.endswith(b".py")), ""
            )
            module = cmdline[2].decode(errors="replace") if cmdline[1:2] == [b"-m"] else ""
            name = Path(script).name or module or program
        found[pid] = (name, (int(stat[11]) + int(stat[12])) / ticks)
    return found


def summarize_profile(path: Path, top: int = 10) -> list[tuple[str, float, float]]:
    """(function, self %, inclusive %) from py-spy's raw output (recorded with --gil: only
    samples where the thread held the GIL, i.e. Python work), ranked by inclusive share;
    event-loop and thread wrappers left out."""
    self_samples: dict[str, int] = {}
    incl_samples: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        count = int(count_text)
        total += count
        self_samples[frames[-1]] = self_samples.get(frames[-1], 0) + count
        for frame in set(frames):
            if not any(generic in frame for generic in GENERIC_FRAMES):
                incl_samples[frame] = incl_samples.get(frame, 0) + count
    if not total:
        return []
    ranked = sorted(incl_samples.items(), key=lambda item: -item[1])[:top]
    return [
        (name, 100 * self_samples.get(name, 0) / total, 100 * count / total)
        for name, count in ranked
    ]


# ---------------------------------------------------------------------------------------------
# Null engine: our whole stack over HTTP with the fake engine vs the fake engine in-process.


async def _inprocess_fake(streams: int, tokens: int) -> dict[str, float]:
    from app.config import ModelConfig
    from app.protocol.generation import EngineCounts, GenerationRequest, SamplingOptions
    from tests.fakes.fake_engine import FakeAdapter

    model = ModelConfig.model_validate(
        {
            "id": NULL_MODEL_ID,
            "engine": {"extra_args": {"kv_blocks": 1_000_000, "max_model_len": 1_000_000}},
        }
    )
    adapter = FakeAdapter(model)
    await adapter.start()

    async def one() -> tuple[float, int]:
        request = GenerationRequest(
            request_id=uuid.uuid4().hex,
            model=NULL_MODEL_ID,
            prompt="hello " * 32,
            sampling=SamplingOptions(max_new_tokens=tokens),
        )
        started = time.perf_counter()
        first = 0.0
        count = 0
        prompt_ids = await adapter.prompt_token_ids(request)
        async for chunk in adapter.generate(request, prompt_ids, EngineCounts()):
            if chunk.text_delta and not first:
                first = time.perf_counter() - started
            count += len(chunk.token_ids)
        return first, count

    started = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - started
    return {
        "tok_s": sum(r[1] for r in results) / elapsed,
        "ttft_p50_ms": (percentile([r[0] for r in results], 50) or 0.0) * 1000,
    }


@contextlib.contextmanager
def null_target(
    system: str, args: argparse.Namespace, log_dir: Path
) -> Iterator[tuple[str, str, Host | None]]:
    """(base url, model, host) of a null-engine system: started here, or for `ours-null` an
    already running poolserve app with the fake engine when --null-url is given (the test
    suite's; no host then)."""
    if system == "ours-null" and args.null_url:
        yield args.null_url.rstrip("/"), args.null_model, None
        return
    with running(system, log_dir) as host:
        yield host.base_url, NULL_MODEL_ID, host


def null_engine(
    args: argparse.Namespace,
    log_dir: Path,
    log_file: Path,
    profiles: dict[str, list[tuple[str, float, float]]],
) -> list[dict[str, Any]]:
    """Per stream count: poolserve + fake engine over HTTP, the fake engine behind a minimal
    single-process HTTP server (fake-http), and the fake engine in-process. With --profile,
    an extra run of poolserve at the most streams (8x the prompts) is profiled."""
    measured: dict[str, dict[int, dict[str, Any]]] = {}
    for system in ("ours-null", "fake-http"):
        with null_target(system, args, log_dir) as (base_url, model, host):
            run_bench(  # warm-up: first requests pay imports and connection setup
                base_url, model, Workload("warm-up", 4, 8, 32, 16, seed=7), log_file
            )
            for streams in args.null_streams:
                workload = Workload(
                    f"null c={streams}",
                    streams,
                    max(streams, args.null_prompts),
                    32,
                    args.null_tokens,
                    seed=300 + streams,
                )
                load_before = os.getloadavg()[0]
                result = run_bench(base_url, model, workload, log_file)
                result["load_before"] = load_before
                measured.setdefault(system, {})[streams] = result
                log(
                    f"{system} {streams} streams: {result['output_tok_s']:.0f} tok/s, "
                    f"first token p50 {result['ttft_p50_ms']:.1f} ms, errors {result['errors']}"
                )
            if args.profile and system == "ours-null" and host is not None:
                streams = max(args.null_streams)
                profiled = Workload(
                    "null profiled",
                    streams,
                    8 * max(streams, args.null_prompts),
                    32,
                    args.null_tokens,
                    seed=999,
                )
                for role, rows in profile_run(
                    host, profiled, log_dir, args.profile, log_file, model
                ).items():
                    profiles[f"poolserve, null engine: {role}"] = rows
    return [
        {
            "streams": streams,
            "prompts": max(streams, args.null_prompts),
            "tokens": args.null_tokens,
            "http": measured["ours-null"][streams],
            "minimal": measured["fake-http"][streams],
            "inprocess": asyncio.run(_inprocess_fake(streams, args.null_tokens)),
        }
        for streams in args.null_streams
    ]


# ---------------------------------------------------------------------------------------------
# One start of a system: warm-up, passes over the workloads, optional profile.


WAKER = """
import sys, time
period, work_s = 1 / float(sys.argv[1]), float(sys.argv[2]) / 1e6
while True:
    time.sleep(period)
    end = time.perf_counter() + work_s
    while time.perf_counter() < end:
        pass
"""


@contextlib.contextmanager
def background_wakeups(rate: float, work_us: float = 20) -> Iterator[None]:
    """--background-wakeups: a process that wakes `rate` times a second and runs `work_us` of
    CPU each time, as the timers and pollers of a serving stack's other processes do (an
    experiment: what such wakeups cost an engine whose threads fill both cores)."""
    if not rate:
        yield
        return
    waker = subprocess.Popen([sys.executable, "-c", WAKER, str(rate), str(work_us)])
    try:
        yield
    finally:
        waker.kill()
        waker.wait()


def run_pass(
    host: Host,
    system: str,
    current: RunRecord,
    items: list[Workload],
    index: int,
    log_file: Path,
) -> None:
    for workload in items:
        workload = replace(workload, seed=workload.seed + 1000 * index)
        queued = run_queue_seconds()
        metrics = run_bench(host.base_url, MODEL_ID, workload, log_file)
        metrics["client_wait_ms"] = (run_queue_seconds() - queued) * 1000
        current.results[workload.name] = metrics
        log(
            f"round {current.round} {system:6} {workload.name:22} "
            f"{metrics['output_tok_s']:7.1f} tok/s  TTFT p50 "
            f"{metrics['ttft_p50_ms']:7.1f} ms  p99 {metrics['ttft_p99_ms']:7.1f}"
            f"  TPOT p50 {metrics['tpot_p50_ms']:6.1f} ms  client waited for a core "
            f"{metrics['client_wait_ms']:.0f} ms  errors "
            f"{metrics['errors']}/{workload.num_prompts} {metrics['first_error']}"
        )


def run_system(
    args: argparse.Namespace,
    system: str,
    round_index: int,
    items: list[Workload],
    records: list[RunRecord],
    profiles: dict[str, list[tuple[str, float, float]]],
    log_file: Path,
) -> None:
    """One start of `system`: warm-up, then `--passes` passes over the workloads (fresh prompts
    each pass: no prefix-cache hits from an earlier pass), then stop. One RunRecord per pass."""
    started = time.monotonic()
    passes = [
        RunRecord(system, f"{round_index}" if args.passes == 1 else f"{round_index}.{p + 1}")
        for p in range(args.passes)
    ]
    records.extend(passes)
    current = passes[0]
    current.load_before = os.getloadavg()
    try:
        with beside(args.beside, args.log_dir), running(system, args.log_dir) as host:
            current.startup_s = host.startup_s
            client_priority(not args.normal_priority)  # back to normal below
            if args.warmup_prompts:
                warmup = Workload(
                    "warm-up",
                    args.warmup_prompts,
                    args.warmup_prompts,
                    args.input_len,
                    8,
                    seed=1,
                )
                run_bench(host.base_url, MODEL_ID, warmup, log_file)
            for index, current in enumerate(passes):
                pass_started = time.monotonic()
                if index:
                    current.load_before = os.getloadavg()
                with background_wakeups(args.background_wakeups):
                    run_pass(host, system, current, items, index, log_file)
                current.load_after = os.getloadavg()
                current.wall_s = time.monotonic() - pass_started
            if (
                args.profile
                and round_index == args.rounds
                and system in ("ours", "vllm", "rayllm")
                and items
            ):
                heavy = max(items, key=lambda w: w.concurrency)
                profiled = replace(
                    heavy, name="profiled", num_prompts=2 * heavy.num_prompts, seed=999
                )
                for role, rows in profile_run(
                    host, profiled, args.log_dir, args.profile, log_file
                ).items():
                    profiles[f"{SYSTEMS[system]}: {role}"] = rows
    except Exception as error:  # noqa: BLE001 (one system failing must not lose the others' figures)
        current.error = f"failed: {str(error).splitlines()[0][:160]}"
        log(f"{system}: {current.error}")
    finally:
        client_priority(False)  # the null engine's client competes for the cores as any process
    if current.load_after == (0.0, 0.0, 0.0):
        current.load_after = os.getloadavg()
    log(f"{system}: {time.monotonic() - started:.0f} s from start to stop")
