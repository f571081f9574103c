"""`make serve` / `make stop`: run the whole stack locally on a Ray head of its own.

serve: start a Ray head on 127.0.0.1 (unless ours is already up), `serve deploy` the config,
wait until /health reports every configured model loaded, print the URLs. Idempotent.
stop: shut the Serve app down and stop only the Ray processes of the head `serve` started.

The head runs with this virtualenv's bin directory first on PATH (and VIRTUAL_ENV set), so a Ray
job's `python` (`ray job submit -- python ...`, README "Ray jobs through handles") is the
project's interpreter, and with the repository on PYTHONPATH.

Environment: POOLSERVE_RAY_PORT (GCS, 6380), POOLSERVE_RAY_DASHBOARD_PORT (8265),
POOLSERVE_API_URL (http://127.0.0.1:8000, where /health is polled; Serve's port comes from the
config), POOLSERVE_READY_TIMEOUT_S (600), POOLSERVE_STACK_STATE (.cache/stack.json: the head
`stop` may stop), POOLSERVE_RAY_START_ARGS (extra `ray start` arguments, e.g. other ports and a
--temp-dir for a second head beside this one, as tests/e2e/test_readme.py runs).

GCS fault tolerance (docs/deploy.md): with POOLSERVE_GCS_REDIS=1 `serve` first starts a Redis of
its own (Debian's `redis-server`, installed with apt-get when missing) on 127.0.0.1 at
POOLSERVE_GCS_REDIS_PORT (6381), appending to POOLSERVE_GCS_REDIS_DIR (.cache/gcs-redis), and
starts the head with RAY_REDIS_ADDRESS pointing at it: the GCS keeps its tables and key-value
store (pools, usage) there, a restarted GCS reloads them, and so does the next `serve` after a
`stop`. `stop` stops that Redis too, after the head; its data stays (delete the directory to
start afresh).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from app.serve_env import serve_env

ROOT = Path(__file__).resolve().parent.parent
STATE_FILE = Path(os.environ.get("POOLSERVE_STACK_STATE", str(ROOT / ".cache" / "stack.json")))
BIN = Path(sys.executable).parent
RAY_PORT = int(os.environ.get("POOLSERVE_RAY_PORT", "6380"))
DASHBOARD_PORT = int(os.environ.get("POOLSERVE_RAY_DASHBOARD_PORT", "8265"))
API_URL = os.environ.get("POOLSERVE_API_URL", "http://127.0.0.1:8000")
READY_TIMEOUT_S = float(os.environ.get("POOLSERVE_READY_TIMEOUT_S", "600"))
RAY_START_ARGS = shlex.split(os.environ.get("POOLSERVE_RAY_START_ARGS", ""))
GCS_REDIS = os.environ.get("POOLSERVE_GCS_REDIS", "0").strip() not in ("", "0")
REDIS_PORT = int(os.environ.get("POOLSERVE_GCS_REDIS_PORT", "6381"))
REDIS_DIR = Path(os.environ.get("POOLSERVE_GCS_REDIS_DIR", str(ROOT / ".cache" / "gcs-redis")))
REDIS_SERVER = "/usr/bin/redis-server"
STORAGE_NAMESPACE = "poolserve"
"""RAY_external_storage_namespace: the GCS's key prefix in Redis (one cluster per namespace)."""


def project_path() -> str:
    """PATH with this interpreter's bin directory first: Ray workers, and the shell of a Ray
    job's entrypoint, inherit the head's environment, so `python` there is the project's."""
    rest = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != str(BIN)]
    return os.pathsep.join([str(BIN), *rest])


def project_venv() -> dict[str, str]:
    """VIRTUAL_ENV as `activate` sets it (nothing when not run from a virtualenv)."""
    return {"VIRTUAL_ENV": sys.prefix} if sys.prefix != sys.base_prefix else {}


ENV = {
    **serve_env(),
    **{k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "VIRTUAL_ENV")},
    **project_venv(),
    "PATH": project_path(),
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray 2.60 turns token auth on for a new cluster as soon as ~/.ray/auth_token exists, but the
    # `serve` CLI only sends the token when told to: say it explicitly, everywhere.
    "RAY_AUTH_MODE": "token",
    "RAY_ADDRESS": f"127.0.0.1:{RAY_PORT}",
    "RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{DASHBOARD_PORT}",
    "PYTHONPATH": str(ROOT),
}


def log(message: str) -> None:
    print(f"[stack] {message}", flush=True)


def run(
    *command: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env={**ENV, **(env or {})}, cwd=ROOT, check=check, text=True, capture_output=True
    )


def ray_is_up() -> bool:
    """A GCS listening on our port (instant; `ray status` retries for tens of seconds)."""
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", RAY_PORT)) == 0


def save_state(**fields: object) -> None:
    """Merge `fields` into the state file (what `stop` may stop)."""
    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}
    STATE_FILE.parent.mkdir(parents=True, exist_ok=True)
    STATE_FILE.write_text(json.dumps({**state, **fields}))


def start_ray() -> None:
    if ray_is_up():
        log(f"Ray head already running on 127.0.0.1:{RAY_PORT}")
        warn_if_head_lacks_venv()
        if GCS_REDIS and not head_uses_redis():
            log(
                "warning: POOLSERVE_GCS_REDIS is set but this head's GCS runs without Redis; "
                "`make stop` and `make serve` again to restart it with Redis"
            )
        return
    run(str(BIN / "ray"), "get-auth-token", "--generate")  # creates ~/.ray/auth_token once
    redis_env: dict[str, str] = {}
    if GCS_REDIS:
        start_redis()
        redis_env = {
            "RAY_REDIS_ADDRESS": f"127.0.0.1:{REDIS_PORT}",
            "RAY_external_storage_namespace": STORAGE_NAMESPACE,
        }
    log(f"starting a Ray head on 127.0.0.1:{RAY_PORT} (dashboard 127.0.0.1:{DASHBOARD_PORT})")
    started = time.monotonic()
    result = run(
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={RAY_PORT}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={DASHBOARD_PORT}",
        "--disable-usage-stats",
        *RAY_START_ARGS,
        check=False,
        env=redis_env,
    )
    if result.returncode != 0:
        left = stop_processes(our_ray_pids(RAY_PORT))  # what the failed start left running
        sys.exit(f"ray start failed{f' ({len(left)} left: {left})' if left else ''}:\n"
                 f"{result.stdout}\n{result.stderr}")  # fmt: skip
    save_state(ray_port=RAY_PORT, started_at=time.time())
    log(f"Ray head up in {time.monotonic() - started:.1f} s")


# --- GCS fault tolerance: a Redis of the stack's own ----------------------------------------


def ensure_redis_server() -> str:
    """Debian's redis-server, installed with apt-get when missing (as the tests install
    Chromium). Its package does not start a service of its own where policy-rc.d forbids it
    (containers); elsewhere the system's Redis on 6379 is left alone: ours has its own port."""
    found = shutil.which("redis-server")
    if found or os.access(REDIS_SERVER, os.X_OK):
        return found or REDIS_SERVER
    apt = shutil.which("apt-get")
    if apt is None:
        sys.exit("POOLSERVE_GCS_REDIS needs redis-server; install it (apt-get is not available)")
    log("installing redis-server with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "--no-install-recommends", "redis-server"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run([apt, "update", "-q"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0 or not os.access(REDIS_SERVER, os.X_OK):
        sys.exit(f"cannot install redis-server with apt-get:\n{result.stderr.strip()[-800:]}")
    return REDIS_SERVER


def redis_is_up(port: int = REDIS_PORT) -> bool:
    """Something answers Redis's PING on the port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def start_redis() -> None:
    """Our Redis, appending every write to REDIS_DIR (fsync every second), on 127.0.0.1 only."""
    if redis_is_up():
        log(f"Redis already running on 127.0.0.1:{REDIS_PORT}; the GCS keeps its state there")
        return
    binary = ensure_redis_server()
    REDIS_DIR.mkdir(parents=True, exist_ok=True)
    pidfile = REDIS_DIR / "redis.pid"
    result = run(
        binary,
        "--bind", "127.0.0.1",
        "--port", str(REDIS_PORT),
        "--dir", str(REDIS_DIR),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "",
        "--daemonize", "yes",
        "--pidfile", str(pidfile),
        "--logfile", str(REDIS_DIR / "redis.log"),
        check=False,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not redis_is_up() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not redis_is_up():
        sys.exit(f"redis-server did not start:\n{result.stdout}\n{result.stderr}")
    save_state(redis_port=REDIS_PORT, redis_pidfile=str(pidfile))
    log(f"Redis for the GCS on 127.0.0.1:{REDIS_PORT} (data in {REDIS_DIR})")


def head_uses_redis() -> bool:
    """Our head's GCS server was started with an external Redis."""
    return any(
        b"--redis_address=" in Path(f"/proc/{pid}/cmdline").read_bytes()
        for pid in our_ray_pids(RAY_PORT)
        if Path(f"/proc/{pid}/cmdline").exists()
    )


def stop_redis(state: dict[str, object]) -> None:
    """SIGTERM (Redis flushes its append-only file first) to the Redis `serve` started."""
    pidfile = Path(str(state.get("redis_pidfile", "")))
    port = state.get("redis_port")
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        log(f"Redis on port {port} is not running")
        return
    if b"redis-server" not in cmdline or f":{port}".encode() not in cmdline:
        log(f"pid {pid} of {pidfile} is not our Redis; left alone")
        return
    left = stop_processes([pid], grace_s=30)
    log(f"stopped Redis on port {port}" if not left else f"Redis {pid} survived SIGKILL")


def warn_if_head_lacks_venv() -> None:
    """A head started before `make serve` put the venv on PATH keeps its old environment, and
    Ray jobs there get the system `python`: say how to fix it."""
    for pid in our_ray_pids(RAY_PORT):
        try:
            if b"raylet" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        path = next((e[5:].decode() for e in environ if e.startswith(b"PATH=")), "")
        if path.split(os.pathsep)[0] != str(BIN):
            log(
                f"warning: this head's PATH does not start with {BIN}, so `python` in a Ray job "
                "is not the project's; `make stop && make serve` restarts it with the venv"
            )
        return


def health() -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"{API_URL}/health", timeout=5) as response:
            body: dict[str, object] = json.load(response)
            return body
    except (urllib.error.URLError, OSError, ValueError):
        return None


def wait_until_ready() -> None:
    started = time.monotonic()
    last = ""
    while time.monotonic() - started < READY_TIMEOUT_S:
        report = health()
        models = report.get("models", []) if report else []
        states = ", ".join(f"{m['name']}: {m['state']}" for m in models) if models else "starting"  # type: ignore[index, union-attr]
        if states != last:
            log(f"{time.monotonic() - started:5.1f} s  {states}")
            last = states
        if models and all(m["state"] == "loaded" for m in models):  # type: ignore[index, union-attr]
            log(f"healthy after {time.monotonic() - started:.1f} s")
            return
        time.sleep(2)
    sys.exit(
        f"not healthy after {READY_TIMEOUT_S:.0f} s; see `serve status` and /tmp/ray/session_latest/logs/serve/"
    )


def serve(config: str) -> None:
    start_ray()
    log(f"deploying {config}")
    started = time.monotonic()
    result = run(str(BIN / "serve"), "deploy", config, check=False)
    if result.returncode != 0:
        sys.exit(f"serve deploy failed:\n{result.stdout}\n{result.stderr}")
    log(f"deploy accepted in {time.monotonic() - started:.1f} s; waiting for the engines")
    wait_until_ready()
    print()
    print(f"  API        {API_URL}   (OpenAI: {API_URL}/v1, SIE: {API_URL}/v1/generate/<model>)")
    print(f"  Health     {API_URL}/health")
    print(f"  Dashboard  {API_URL}/dashboard   (live: pools, workers, KV cache, usage)")
    print(
        f"  Ray        http://127.0.0.1:{DASHBOARD_PORT}   (Ray's dashboard: actors, Serve, logs)"
    )
    print("  Stop       make stop")


def process_tree(is_root: Callable[[str], bool]) -> list[int]:
    """Processes whose command line `is_root` accepts, and all their descendants (Ray workers,
    vLLM engine processes); never this process."""
    children: dict[int, list[int]] = {}
    roots = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(proc.name))
        if is_root(cmdline):
            roots.append(int(proc.name))
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return sorted(found)


def stop_processes(pids: list[int], grace_s: float = 15) -> list[int]:
    """SIGTERM, then SIGKILL what is left; returns the processes that survived both."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.3)
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
        if not pids:
            break
    return pids


def our_ray_pids(port: int) -> list[int]:
    """The head we started: its processes name its GCS port on their command line."""
    marker = re.compile(rf"(127\.0\.0\.1:|--gcs_server_port=){port}(?!\d)")
    return process_tree(lambda cmdline: bool(marker.search(cmdline)) and "stack.py" not in cmdline)


def stop() -> None:
    if not STATE_FILE.exists():
        if ray_is_up():
            log("the Ray head was not started by `make serve`; shutting down only the Serve app")
            run(str(BIN / "serve"), "shutdown", "-y", check=False)
        else:
            log("nothing to stop")
        return
    state = json.loads(STATE_FILE.read_text())
    port = state.get("ray_port")
    if port is not None:
        if ray_is_up():
            log("shutting down Serve")
            run(str(BIN / "serve"), "shutdown", "-y", check=False)
        pids = our_ray_pids(port)
        log(f"stopping {len(pids)} Ray processes of the head on port {port}")
        left = stop_processes(pids)
        if left:
            log(f"{len(left)} processes survived SIGKILL: {left}")
    if "redis_port" in state:
        stop_redis(state)
    STATE_FILE.unlink()
    log("stopped")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve")
    serve_parser.add_argument("--config", default="serve_config.yaml")
    sub.add_parser("stop")
    args = parser.parse_args()
    if args.command == "serve":
        serve(args.config)
    else:
        stop()


if __name__ == "__main__":
    main()
