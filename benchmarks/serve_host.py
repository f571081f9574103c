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
from pathlib import Path
from typing import Any

from fastapi import Request  # module level: FastAPI resolves the handler's annotations here

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.engine.default_model import default_model_dir  # noqa: E402
from tests.support.vllm_server import (  # noqa: E402
    BASE_ENV,
    bench_model,
    engine_settings,
    scheduler_kwargs,
    serve_config_app,
    vllm_command,
)

MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
NULL_MODEL_ID = "null/model"
READY_TIMEOUT_S = float(os.environ.get("BENCH_READY_TIMEOUT_S", "900"))


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
    from app.protocol.generation import EngineCounts, GenerationRequest, SamplingOptions
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
        chunks = adapter.generate(request, await adapter.prompt_token_ids(request), EngineCounts())
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
