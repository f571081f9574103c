"""Host one system under test for benchmarks/compare.py, until killed.

    python benchmarks/serve_host.py --system {vllm,rayllm,ours,ours-null} --port P --tag T

- vllm: bare vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`) as a child.
- rayllm: Ray Serve LLM's own OpenAI app (`ray.serve.llm.build_openai_app`) on a private local
  Ray cluster (run it with the `.venv-rayllm` interpreter: Ray Serve LLM needs pyarrow/pandas).
- ours: poolserve's `build_app` with serve_config.yaml's args on a private local Ray cluster.
- ours-null: poolserve with the fake engine (tests/fakes/fake_engine.py, no token delay).
- fake-http: the null-engine baseline: the same fake engine behind a minimal single-process
  FastAPI + uvicorn OpenAI chat server (one SSE event per token, as bare vLLM's server sends
  them): what any HTTP front end costs, without Ray.

Every system serves the same SmolLM2 directory with the same engine settings (ENGINE below,
read from serve_config.yaml). Prints `READY <base url>` once a chat completion works, then
sleeps; compare.py stops it by killing every process whose command line names the tag (the
Ray cluster's temp dir is named after it too) and their descendants.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from fastapi import Request  # module level: FastAPI resolves the handler's annotations here

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine.default_model import default_model_dir  # noqa: E402

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
NULL_MODEL_ID = "null/model"
READY_TIMEOUT_S = float(os.environ.get("BENCH_READY_TIMEOUT_S", "900"))

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


def engine_env() -> dict[str, str]:
    return {**BASE_ENV, "VLLM_CPU_KVCACHE_SPACE": f"{engine_settings()['cpu_kv_cache_gib']:g}"}


def null_app_args() -> dict[str, Any]:
    return {
        "engine_adapter": "tests.fakes.fake_engine:FakeAdapter",
        "models": [
            {
                "id": NULL_MODEL_ID,
                "engine": {
                    "extra_args": {
                        "token_delay_s": 0.0,
                        "kv_blocks": 1_000_000,
                        "max_model_len": 1_000_000,
                    }
                },
            }
        ],
        "profiles": [{"name": "cpu", "num_cpus": 0, "max_ongoing_requests": 512}],
        "kv": {"max_waiting_requests": 1000},
    }


def chat_works(base_url: str, model: str) -> bool:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4,
            "temperature": 0,
        }
    ).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", body, {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_ready(base_url: str, model: str, child: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if child is not None and child.poll() is not None:
            sys.exit(f"the server exited with {child.returncode} before it was ready")
        if chat_works(base_url, model):
            return
        time.sleep(2)
    sys.exit(f"{base_url} not ready after {READY_TIMEOUT_S:.0f} s")


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


def start_vllm(port: int, log_dir: Path) -> subprocess.Popen[bytes]:
    model = bench_model()
    # the engine only: the benchmark sends no tools and names no LoRA adapter
    command = vllm_command(port, {"id": model["id"], "engine": model["engine"]})
    log = (log_dir / "vllm-server.log").open("wb")
    env = {**os.environ, **engine_env(), "VLLM_CACHE_ROOT": str(log_dir / "vllm-cache")}
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir)


def start_ray(tag: str) -> None:
    import ray

    os.environ.update(engine_env())
    # a loaded 2-core machine can take longer than Ray's defaults to bring a node's agents up
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    temp_dir = Path(tempfile.gettempdir()) / tag  # short: Ray's socket paths
    ray.init(
        address="local",
        num_cpus=4,  # more logical CPUs than cores: the ingress must fit beside the engine
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(temp_dir),
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **engine_env()}},
    )


def start_rayllm(port: int) -> None:
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    settings = engine_settings()
    config = LLMConfig(
        model_loading_config={"model_id": MODEL_ID, "model_source": str(default_model_dir())},
        accelerator_config={"kind": "cpu"},
        engine_kwargs={
            "dtype": settings["dtype"],
            "enforce_eager": settings["enforce_eager"],
            "max_model_len": settings["max_model_len"],
            "max_num_seqs": settings["max_num_seqs"],
            "enable_prefix_caching": settings["enable_prefix_caching"],
            **scheduler_kwargs(),
        },
        deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        runtime_env={"env_vars": engine_env()},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_openai_app({"llm_configs": [config]}), blocking=False)


def start_ours(port: int, null: bool) -> None:
    from ray import serve

    from app.builder import build_app

    app = serve_config_app()
    args = null_app_args() if null else app["args"]
    # compare.py --ours-args: JSON merged into the app's args, one level deep (experiments)
    for key, value in json.loads(os.environ.get("BENCH_OURS_ARGS") or "{}").items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            args[key] = {**args[key], **value}
        else:
            args[key] = value
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(args),
        name=app["name"],
        route_prefix=app.get("route_prefix", "/"),
        external_scaler_enabled=bool(app.get("external_scaler_enabled", False)),
        blocking=False,
    )


def serve_fake_http(port: int) -> None:
    """Single process: FastAPI + uvicorn + the fake engine, OpenAI chat SSE, one event per
    token (bare vLLM's own server shape with an instant engine)."""
    import asyncio
    import threading
    import uuid

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse

    from app.config import ModelConfig
    from app.protocol.generation import GenerationRequest, SamplingOptions
    from tests.fakes.fake_engine import FakeAdapter

    adapter = FakeAdapter(ModelConfig.model_validate(null_app_args()["models"][0]))
    asyncio.run(adapter.start())
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": NULL_MODEL_ID, "object": "model"}]})

    @app.post("/v1/chat/completions")
    async def chat(raw: Request) -> Any:
        body = await raw.json()
        request = GenerationRequest(
            request_id=uuid.uuid4().hex,
            model=NULL_MODEL_ID,
            prompt=" ".join(str(m.get("content", "")) for m in body["messages"]),
            sampling=SamplingOptions(
                max_new_tokens=body.get("max_completion_tokens") or body.get("max_tokens") or 16
            ),
        )
        chunks = adapter.generate(request, await adapter.prompt_token_ids(request))
        if not body.get("stream"):
            text = "".join([chunk.text_delta async for chunk in chunks])
            return JSONResponse({"choices": [{"index": 0, "message": {"content": text}}]})

        async def events() -> Any:
            head = {
                "id": request.request_id,
                "object": "chat.completion.chunk",
                "model": NULL_MODEL_ID,
            }
            completion = 0
            async for chunk in chunks:
                if chunk.text_delta:
                    completion += 1
                    delta = {"content": chunk.text_delta}
                    data = {**head, "choices": [{"index": 0, "delta": delta}]}
                    yield f"data: {json.dumps(data)}\n\n"
            usage = {"prompt_tokens": 0, "completion_tokens": completion}
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    threading.Thread(target=server.run, daemon=True).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--system", choices=["vllm", "rayllm", "ours", "ours-null", "fake-http"], required=True
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tag", required=True, help="names this host's processes and temp dir")
    parser.add_argument("--log-dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args()
    args.log_dir.mkdir(parents=True, exist_ok=True)
    base_url = f"http://127.0.0.1:{args.port}"
    started = time.monotonic()
    child = None
    if args.system == "vllm":
        child = start_vllm(args.port, args.log_dir)
    elif args.system == "fake-http":
        serve_fake_http(args.port)
    else:
        # compare.py --serve-env: which Serve-based systems run with poolserve's Serve settings
        if args.system in os.environ.get("BENCH_SERVE_ENV", "ours,ours-null").split(","):
            from app.serve_env import serve_env

            os.environ.update(serve_env())
        start_ray(args.tag)
        if args.system == "rayllm":
            start_rayllm(args.port)
        else:
            start_ours(args.port, null=args.system == "ours-null")
    null = args.system in ("ours-null", "fake-http")
    wait_ready(base_url, NULL_MODEL_ID if null else MODEL_ID, child)
    print(f"READY {base_url} {time.monotonic() - started:.1f}", flush=True)
    while child is None or child.poll() is None:
        time.sleep(1)
    sys.exit(f"the server exited with {child.returncode}")


if __name__ == "__main__":
    main()
