"""The Generator deployment through Serve streaming handles, on a real local Ray cluster:
coalescing into few Ray objects, cancellation freeing the engine request, refusals in band. The
chunk contract both engines keep is tests/integration/test_adapter_contract.py."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import httpx
import pytest

from app.protocol.generation import GenerationChunk, GenerationRequest, SamplingOptions
from tests.conftest import FAKE_MODEL, REAL_MODEL, Stack
from tests.support.worker_calls import WorkerStream, worker_items

pytestmark = pytest.mark.integration


def request(model: str, max_new_tokens: int | None, **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        model=model,
        prompt="The quick brown fox",
        sampling=SamplingOptions(max_new_tokens=max_new_tokens, temperature=0.0, **sampling),  # type: ignore[arg-type]
    )


def stream(stack: Stack, app: str, generation: GenerationRequest) -> list[list[GenerationChunk]]:
    return worker_items(stack.handle("Generator-cpu", app), generation)


def test_replica_log_records_refusals_without_tracebacks(stack: Stack) -> None:
    """With vLLM loaded, the Generator replica's Serve log still receives its request records
    (vLLM's logging setup used to cut the request-path log handler off its file, which then
    kept every record in memory: ~21 KB leaked per refused request), and a refusal is logged
    as an answered call, not as a failed request with a traceback."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    (log,) = logs.glob("replica_poolserve_Generator-cpu_*.log")
    offset = log.stat().st_size
    ids = [uuid.uuid4().hex for _ in range(3)]
    for request_id in ids:
        response = httpx.post(
            f"{stack.base_url}/v1/chat/completions",
            headers={"X-Request-Id": request_id},
            json={
                "model": REAL_MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4096,  # beyond the context: vLLM refuses it
            },
            timeout=30,
        )
        assert response.status_code == 400, response.text
    # the calls that carried them (a call carries a group of requests: its own record)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with log.open() as file:
            file.seek(offset)
            lines = file.read().splitlines()
        if any("CALL generate OK" in line for line in lines):
            break
        time.sleep(0.2)
    assert [line for line in lines if "CALL generate OK" in line], lines
    assert not [line for line in lines if "Request failed" in line or "ERROR" in line], lines


def test_cancelling_the_stream_aborts_the_engine_request(stack: Stack) -> None:
    """400 tokens take ~30 s here; after cancel the engine must be idle within seconds."""
    app, model = "poolserve", REAL_MODEL
    response = WorkerStream(
        stack.handle("Generator-cpu", app), request(model, 400, ignore_eos=True)
    )
    first = next(iter(response))
    assert first
    response.cancel()
    assert stack.wait_idle(app, model, timeout_s=10)


def test_fast_tokens_are_coalesced_into_few_ray_objects(stack: Stack) -> None:
    batches = stream(stack, "fake", request(FAKE_MODEL, 400))
    chunks = [chunk for batch in batches for chunk in batch]
    assert chunks[-1].completion_tokens == 400
    assert len(batches) < 100, f"{len(batches)} Ray objects for 400 tokens"


def test_a_worker_of_another_pool_refuses_in_band_one_of_the_pool_serves(stack: Stack) -> None:
    """The ingress names the workers of the request's pool. A replica assigned to another pool
    answers with a retryable WorkerUnavailable as the stream's only item and starts nothing;
    one of the request's pool that the ingress did not name (it replaced a draining one since
    the ingress looked) serves it."""
    import dataclasses

    from app.errors import WorkerUnavailable

    handle = stack.handle("Generator-cpu", "fake")
    other_pool = dataclasses.replace(request(FAKE_MODEL, 8), pool="eval")
    items = worker_items(handle, other_pool, worker="another-worker")
    assert len(items) == 1 and isinstance(items[0], WorkerUnavailable), items
    assert items[0].status == 503
    assert stack.worker_status("fake").active_requests == 0
    same_pool = worker_items(handle, request(FAKE_MODEL, 8), worker="another-worker")
    chunks = [chunk for batch in same_pool for chunk in batch]
    assert chunks and chunks[-1].done and chunks[-1].finish_reason == "length", same_pool


def test_the_ingress_routes_on_its_own_event_loop(stack: Stack) -> None:
    """app/serve_env.py's per-handle setting took: every Ingress replica's handles route with
    Serve's CurrentLoopRouter (a silent fall-back to the separate router loop fails here), and
    the replicas run user code on their own loop (the session cluster has the node settings)."""
    import ray

    from app.serve_env import SERVE_ENV

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    ingress_logs = list(logs.glob("replica_*_Ingress_*.log"))
    assert ingress_logs
    for log in ingress_logs:
        lines = [line for line in log.read_text().splitlines() if "ingress handles route" in line]
        assert lines and all(line.endswith("with CurrentLoopRouter") for line in lines), lines
    env = ray.get(ray.remote(lambda: {k: os.environ.get(k) for k in SERVE_ENV}).remote())
    assert env == SERVE_ENV


def listeners() -> dict[tuple[str, int], str]:
    """Listening TCP sockets of this machine: (address, port) -> the owning process's name
    (from /proc: IPv4 only, which is what Serve binds for 127.0.0.1)."""
    inodes: dict[str, tuple[str, int]] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] != "0A":  # LISTEN
            continue
        address, port = fields[1].split(":")
        ip = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
        inodes[fields[9]] = (ip, int(port, 16))
    found: dict[tuple[str, int], str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            name = (proc / "comm").read_text().strip()
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    found[inodes[target[8:-1]]] = name
        except OSError:
            continue
    return found


def command_lines() -> list[list[str]]:
    """Every process's argv (from /proc)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")[:-1] if proc.name.isdigit() else []
        except OSError:
            continue
        if argv:
            found.append([arg.decode(errors="replace") for arg in argv])
    return found


def test_http_reaches_the_ingress_through_the_entry_serve_env_chose(stack: Stack) -> None:
    """Direct ingress by default (app/serve_env.py): the session's HTTP port is HAProxy's, which
    runs without kernel splicing (`-dS`, scripts/haproxy-wrapper), the Python proxy is only its
    fallback, and the Ingress replica serves HTTP itself on a 127.0.0.1 port. With it turned off
    (RAY_SERVE_ENABLE_HA_PROXY=0), Serve's Python proxy. Either way the port is on 127.0.0.1 only
    and an ordinary request answers through it."""
    import ray

    from app.serve_env import direct_ingress

    port = int(stack.base_url.rsplit(":", 1)[1])
    listening = listeners()
    assert ("0.0.0.0", port) not in listening, listening
    classes = {
        entry["name"]: ray.get_actor(
            entry["name"], namespace=entry["namespace"]
        )._ray_actor_creation_function_descriptor.class_name
        for entry in ray.util.list_named_actors(all_namespaces=True)
        if entry["name"].startswith("SERVE_PROXY_ACTOR")
    }
    if not direct_ingress():
        assert listening.get(("127.0.0.1", port)) == "ray::ProxyActor", listening
        assert list(classes.values()) == ["ProxyActor"], classes
    else:
        assert listening.get(("127.0.0.1", port)) == "haproxy", listening
        haproxies = [argv for argv in command_lines() if argv[0].endswith("/haproxy")]
        assert haproxies and all(argv[1] == "-dS" for argv in haproxies), haproxies
        assert sorted(classes.values()) == ["HAProxyManager", "ProxyActor"], classes
        assert all("fallback" in name for name, cls in classes.items() if cls == "ProxyActor")
        ingress_ports = [
            p for (ip, p), name in listening.items() if ip == "127.0.0.1" and 30000 <= p <= 31000
        ]
        assert ingress_ports, listening
        assert all(
            name.startswith("ray::ServeRepli")
            for (ip, p), name in listening.items()
            if p in ingress_ports
        )
    response = httpx.get(f"{stack.base_url}/health", timeout=30)
    assert response.status_code == 200, response.text
