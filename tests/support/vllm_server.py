"""Bare vLLM's OpenAI server as poolserve's engine runs it: the same engine block (serve_config.yaml's
first model, or a test stack's model entry), the scheduler arguments our adapter gives vLLM, and
the environment every engine sees. benchmarks/compare.py measures against this server and
tests/e2e/test_vllm_parity.py checks our answers against it."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from app.engine.default_model import default_model_dir

ROOT = Path(__file__).resolve().parents[2]

# Environment every engine sees (cpu-engine.md: settings that work on these machines).
BASE_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
}


def serve_config_app() -> dict[str, Any]:
    """The `poolserve` application of serve_config.yaml (the production entry)."""
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    app: dict[str, Any] = config["applications"][0]
    return app


def bench_model() -> dict[str, Any]:
    """serve_config.yaml's first model: the one every system of the comparison serves."""
    model: dict[str, Any] = serve_config_app()["args"]["models"][0]
    return model


def engine_settings(engine: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An engine block (default: serve_config.yaml's first model's), with this module's
    defaults."""
    if engine is None:
        engine = bench_model()["engine"]
    return {
        "dtype": engine.get("dtype", "float32"),
        "enforce_eager": engine.get("enforce_eager", True),
        "max_model_len": engine.get("max_model_len", 2048),
        "max_num_seqs": engine.get("max_num_seqs", 64),
        "enable_prefix_caching": engine.get("enable_prefix_caching", True),
        "cpu_kv_cache_gib": engine.get("cpu_kv_cache_gib", 2),
    }


def scheduler_kwargs() -> dict[str, Any]:
    """The scheduler arguments poolserve's adapter gives vLLM beyond serve_config's engine block
    (its defaults: priority scheduling, chunked prefill off on CPU), so that every system of the
    comparison runs the same engine."""
    from app.config import AppConfig
    from app.engine.vllm_adapter import chunked_prefill

    engine = AppConfig.model_validate(serve_config_app()["args"]).models[0].engine
    return {
        "scheduling_policy": engine.scheduling_policy,
        **chunked_prefill(engine.enable_chunked_prefill, engine.max_model_len, engine.extra_args),
    }


def scheduler_flags() -> list[str]:
    """`scheduler_kwargs` as `vllm serve` flags."""
    flags: list[str] = []
    for name, value in scheduler_kwargs().items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        else:
            flags += [flag, str(value)]
    return flags


def vllm_command(port: int, model: Mapping[str, Any]) -> list[str]:
    """Bare vLLM's OpenAI server for one entry of AppConfig's `models` (serve_config.yaml's or
    the test stack's): its engine block and the scheduler arguments our adapter gives vLLM,
    plus its LoRA adapters and OpenAI front-end options when the entry has them."""
    settings = engine_settings(model.get("engine", {}))
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(default_model_dir()),
        "--served-model-name",
        str(model["id"]),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        str(settings["dtype"]),
        "--max-model-len",
        str(settings["max_model_len"]),
        "--max-num-seqs",
        str(settings["max_num_seqs"]),
        "--enable-prefix-caching"
        if settings["enable_prefix_caching"]
        else "--no-enable-prefix-caching",
        # as our adapter sizes it (VLLM_CPU_KVCACHE_SPACE, when set, overrides it)
        "--kv-cache-memory-bytes",
        str(int(settings["cpu_kv_cache_gib"] * 2**30)),
    ]
    if settings["enforce_eager"]:
        command.append("--enforce-eager")
    command += scheduler_flags()  # as our adapter sets them (priority, chunked prefill off on CPU)
    if model.get("lora_adapters"):  # our engine runs with LoRA on: so does this one
        from app.engine.demo_lora import resolve_lora_source

        command += ["--enable-lora", "--max-lora-rank", str(model.get("max_lora_rank", 8))]
        command += ["--max-loras", str(len(model["lora_adapters"])), "--lora-modules"]
        command += [
            f"{name}={resolve_lora_source(source)}"
            for name, source in sorted(model["lora_adapters"].items())
        ]
    openai = model.get("openai") or {}
    if openai.get("enable_auto_tool_choice"):
        command.append("--enable-auto-tool-choice")
    if openai.get("tool_call_parser"):
        command += ["--tool-call-parser", openai["tool_call_parser"]]
    return command
