"""Drive the service with the real, unmodified `sie-sdk` Python client.

sie-sdk needs Python >= 3.12 and the project runs on 3.11, so the client lives in its own venv,
`.venv-sie`, built once per checkout from `tests/sie-requirements.lock` (pinned, `--no-deps`)
and reused while the lock file is unchanged and its interpreter still runs (a stamp file holds
the lock's digest). A first build takes ~25 s (pip download of ~20 wheels).
Client code runs in a subprocess of that venv; its result comes back as JSON.

    from tests.sie import SIEFailure, run_sie

    result = run_sie('''
        out = client.generate(MODEL, "Hello", max_new_tokens=4)
        chunks = [c async for c in aclient.stream_generate(MODEL, "Hi", max_new_tokens=4)]
        return {"sync": out, "async": chunks}
    ''', base_url, inject={"MODEL": "org/name"})

A snippet is the body of an `async def`: `client` (`SIEClient`) and `aclient`
(`SIEAsyncClient`) are ready (both closed afterwards), `sie_sdk` is imported, and the value it
`return`s is the result (JSON-serialisable after a lenient conversion: numpy arrays become
lists, unknown objects their repr). An exception that escapes the snippet is raised in pytest as
`SIEFailure`, carrying the SDK exception's class name, its base classes, code, status, param and
message. To look at several errors in one subprocess, use the helpers inside the snippet:

    catch(fn, *args, **kwargs)      # sync call -> error_info dict
    await acatch(awaitable_or_fn)   # async call (or async callable) -> error_info dict
    await alist(async_iterable)     # collect an async iterator

`error_info` is `{"type", "types", "message", "code", "status_code", "param", ...}` for a raised
exception and `{"type": None, "result": <value>}` when nothing was raised.

To look at the server while the client is mid-way (a stream held open, a pool lease alive),
start the snippet in the background and meet it at checkpoints:

    with start_sie('''
        for chunk in client.stream_generate(MODEL, "Hi", max_new_tokens=500):
            await checkpoint("streaming")
            break
    ''', base_url, inject={"MODEL": model}) as process:
        process.wait_reached("streaming")
        ...  # inspect the server
        process.release("streaming")
        process.result()
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-sie"
LOCK_FILE = ROOT / "tests" / "sie-requirements.lock"
STAMP = VENV / ".sie-installed.json"
MIN_PYTHON = (3, 12)
DEFAULT_TIMEOUT_S = 180.0
INSTALL_TIMEOUT_S = 900.0

_ready: Path | None = None


class SIEFailure(Exception):
    """An exception escaped a snippet; the attributes describe the SDK exception."""

    def __init__(self, info: dict[str, Any], traceback: str = "") -> None:
        self.info = info
        self.type: str = info.get("type") or "?"
        self.types: list[str] = info.get("types") or []
        self.code: str | None = info.get("code")
        self.status_code: int | None = info.get("status_code")
        self.param: str | None = info.get("param")
        self.message: str = info.get("message") or ""
        self.traceback = traceback
        super().__init__(
            f"{self.type}(code={self.code!r}, status_code={self.status_code!r}, "
            f"param={self.param!r}): {self.message}\n{traceback}"
        )

    def is_a(self, name: str) -> bool:
        """True if the SDK exception is `name` or a subclass of it (e.g. 'RequestError')."""
        return name in self.types


# ---------------------------------------------------------------------------------------------
# The venv


def sie_python() -> Path:
    """The interpreter of `.venv-sie` with the pinned sie-sdk, creating the venv if needed.

    Safe to call from several processes at once (a file lock serialises the build); cheap
    after the first call (a stamp check)."""
    global _ready
    if _ready is not None:
        return _ready
    python = VENV / "bin" / "python"
    wanted = _lock_digest()
    if _stamp_matches(wanted) and python.exists():
        _ready = python
        return python
    with _file_lock(Path(tempfile.gettempdir()) / f"poolserve-sie-{_root_digest()}.lock"):
        if not (_stamp_matches(wanted) and python.exists()):
            _build_venv(wanted)
    _ready = python
    return python


def venv_build_seconds() -> float | None:
    """How long the current `.venv-sie` took to build (from its stamp), if known."""
    try:
        seconds = json.loads(STAMP.read_text())["build_seconds"]
    except (OSError, ValueError, KeyError):
        return None
    return float(seconds)


def _lock_digest() -> str:
    return hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()


def _root_digest() -> str:
    return hashlib.sha256(str(ROOT).encode()).hexdigest()[:16]


def _stamp_matches(lock_digest: str) -> bool:
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(stamp, dict) and stamp.get("lock_sha256") == lock_digest


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_venv(lock_digest: str) -> None:
    started = time.monotonic()
    base = find_base_python()
    shutil.rmtree(VENV, ignore_errors=True)
    _run([str(base), "-m", "venv", str(VENV)], "create .venv-sie")
    python = VENV / "bin" / "python"
    _run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            "--no-deps",
            "-r",
            str(LOCK_FILE),
        ],
        "install tests/sie-requirements.lock into .venv-sie",
    )
    version = _run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('sie-sdk'))"],
        "check the sie-sdk install",
    ).strip()
    elapsed = time.monotonic() - started
    STAMP.write_text(
        json.dumps(
            {
                "lock_sha256": lock_digest,
                "base_python": str(base),
                "sie_sdk": version,
                "build_seconds": round(elapsed, 1),
            }
        )
    )
    print(
        f"\n[tests/sie.py] built .venv-sie (sie-sdk {version}) in {elapsed:.1f} s", file=sys.stderr
    )


def _run(command: list[str], what: str, env: dict[str, str] | None = None) -> str:
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise RuntimeError(f"could not {what}: {error}") from error
    if done.returncode != 0:
        raise RuntimeError(
            f"could not {what} (exit {done.returncode}):\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
        )
    return done.stdout


def _version_of(
    command: list[str], env: dict[str, str] | None = None
) -> tuple[tuple[int, int], str]:
    """(major, minor) and sys.executable of an interpreter, or ((0, 0), '') if it does not run."""
    probe = "import sys; print(sys.version_info[0], sys.version_info[1], sys.executable)"
    try:
        done = subprocess.run(
            [*command, "-c", probe],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0), ""
    parts = done.stdout.split(maxsplit=2)
    if done.returncode != 0 or len(parts) != 3:
        return (0, 0), ""
    return (int(parts[0]), int(parts[1])), parts[2].strip()


def find_base_python() -> Path:
    """A Python >= 3.12 to build the venv from: $SIE_PYTHON, then python3.12+ on PATH, then
    pyenv versions (a pyenv shim only resolves with PYENV_VERSION set)."""
    override = os.environ.get("SIE_PYTHON")
    if override:
        version, executable = _version_of([override])
        if version < MIN_PYTHON:
            raise RuntimeError(f"SIE_PYTHON={override} is not a Python >= 3.12")
        return Path(executable)
    names = ["python3.12", "python3.13", "python3.14", "python3"]
    for name in names:
        found = shutil.which(name)
        if found:
            version, executable = _version_of([found])
            if version >= MIN_PYTHON:
                return Path(executable)
    pyenv = shutil.which("pyenv") or str(Path.home() / ".pyenv" / "bin" / "pyenv")
    candidates = _pyenv_versions(pyenv)
    for release in candidates:
        env = {**os.environ, "PYENV_VERSION": release}
        version, executable = _version_of([pyenv, "exec", "python"], env=env)
        if version >= MIN_PYTHON:
            return Path(executable)
    raise RuntimeError(
        "sie-sdk needs Python >= 3.12 and none was found (tried $SIE_PYTHON, "
        f"{', '.join(names)} on PATH, pyenv versions {candidates or 'none'})"
    )


def _pyenv_versions(pyenv: str) -> list[str]:
    """CPython >= 3.12 releases pyenv knows, 3.12 first (the lock was made there), newest patch
    first within a minor."""
    try:
        listed = subprocess.run(
            [pyenv, "versions", "--bare"], capture_output=True, text=True, timeout=60, check=False
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return []
    releases = []
    for name in listed:
        match = re.fullmatch(r"3\.(\d+)\.(\d+)", name)
        if match and int(match[1]) >= MIN_PYTHON[1]:
            releases.append((int(match[1]), -int(match[2]), name))
    return [name for _, _, name in sorted(releases)]


# ---------------------------------------------------------------------------------------------
# Running client code

_PRELUDE = r"""
import asyncio, json, os, sys, traceback
import sie_sdk
from sie_sdk import SIEAsyncClient, SIEClient

def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    return repr(value)

_ATTRS = ("code", "status_code", "param", "retry_after", "model", "gpu", "pool_name", "state",
          "error_class", "permanent", "attempts", "retries", "request")

def error_info(error):
    info = {
        "type": type(error).__name__,
        "types": [c.__name__ for c in type(error).__mro__ if c not in (object, BaseException)],
        "module": type(error).__module__,
        "message": str(error),
    }
    for name in _ATTRS:
        if hasattr(error, name):
            info[name] = _jsonable(getattr(error, name))
    return info

def catch(fn, *args, **kwargs):
    try:
        return {"type": None, "result": fn(*args, **kwargs)}
    except Exception as error:
        return error_info(error)

async def acatch(target, *args, **kwargs):
    try:
        if callable(target):
            target = target(*args, **kwargs)
        return {"type": None, "result": await target}
    except Exception as error:
        return error_info(error)

async def alist(iterable):
    return [item async for item in iterable]

async def checkpoint(name, timeout_s=600):
    # tell the test we are at `name`, then wait until it releases us (see SIEProcess)
    directory = os.path.dirname(os.path.abspath(sys.argv[1]))
    open(os.path.join(directory, name + ".reached"), "w").close()
    release = os.path.join(directory, name + ".release")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not os.path.exists(release):
        if loop.time() > deadline:
            raise TimeoutError("checkpoint " + repr(name) + " was never released")
        await asyncio.sleep(0.02)

BASE_URL = json.loads(sys.argv[2])
CLIENT_KWARGS = json.loads(sys.argv[3])
globals().update(json.loads(sys.argv[4]))

async def _snippet(client, aclient):
"""

_EPILOGUE = r"""
async def _main():
    client = SIEClient(BASE_URL, **CLIENT_KWARGS)
    aclient = SIEAsyncClient(BASE_URL, **CLIENT_KWARGS)
    try:
        return await _snippet(client, aclient)
    finally:
        client.close()
        await aclient.close()

try:
    _outcome = {"ok": True, "result": _jsonable(asyncio.run(_main()))}
except BaseException as error:
    _outcome = {"ok": False, "error": error_info(error), "traceback": traceback.format_exc()}
with open(sys.argv[1], "w") as _out:
    json.dump(_outcome, _out)
"""


def _program(code: str) -> str:
    body = textwrap.indent(textwrap.dedent(code).strip("\n"), "    ")
    return f"{_PRELUDE}{body or '    pass'}\n{_EPILOGUE}"


def _child_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("SIE_", "PYTHON", "VIRTUAL_ENV", "PYENV_VERSION"))
    }
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    env["PYTHONUNBUFFERED"] = "1"
    return env


class SIEProcess:
    """A snippet running in the background (see `start_sie`); use as a context manager so the
    child is killed and its scratch directory removed whatever happens."""

    def __init__(
        self,
        code: str,
        base_url: str,
        timeout_s: float,
        client_kwargs: dict[str, Any] | None,
        inject: dict[str, Any] | None,
    ) -> None:
        python = sie_python()
        kwargs = {"api_key": "", **(client_kwargs or {})}
        self.deadline = time.monotonic() + timeout_s
        self.timeout_s = timeout_s
        self.scratch = Path(tempfile.mkdtemp(prefix="sie-run-"))
        self._result_file = self.scratch / "result.json"
        script = self.scratch / "snippet.py"
        script.write_text(_program(code))
        self._output = (self.scratch / "output.txt").open("w+")
        self._process = subprocess.Popen(
            [
                str(python),
                str(script),
                str(self._result_file),
                json.dumps(base_url),
                json.dumps(kwargs),
                json.dumps(inject or {}),
            ],
            stdout=self._output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_child_env(),
            cwd=self.scratch,
        )

    def output(self) -> str:
        """What the child printed so far (stdout and stderr, e.g. SDK log warnings)."""
        try:
            return (self.scratch / "output.txt").read_text(errors="replace")
        except OSError:
            return ""

    def wait_reached(self, name: str, timeout_s: float | None = None) -> None:
        """Block until the snippet runs `await checkpoint(name)`. Raises what the snippet raised
        if it ends first, TimeoutError if neither happens in time."""
        marker = self.scratch / f"{name}.reached"
        limit = self.deadline if timeout_s is None else time.monotonic() + timeout_s
        while not marker.exists():
            if self._process.poll() is not None:
                self.result()
                raise RuntimeError(f"sie snippet ended without reaching checkpoint {name!r}")
            if time.monotonic() > limit:
                raise TimeoutError(f"sie snippet did not reach checkpoint {name!r}")
            time.sleep(0.02)

    def release(self, name: str) -> None:
        """Let the snippet continue past `await checkpoint(name)`."""
        (self.scratch / f"{name}.release").touch()

    def result(self) -> Any:
        """Wait for the snippet to finish and return its result (or raise, as `run_sie`)."""
        try:
            self._process.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired as error:
            output = self.output()
            self.close()
            raise TimeoutError(
                f"sie snippet still running after {self.timeout_s} s:\n{output[-4000:]}"
            ) from error
        if not self._result_file.exists():
            raise RuntimeError(
                f"sie snippet died (exit {self._process.returncode}) without a result:\n"
                f"{self.output()[-8000:]}"
            )
        outcome = json.loads(self._result_file.read_text())
        if not outcome["ok"]:
            raise SIEFailure(outcome["error"], outcome.get("traceback", ""))
        return outcome["result"]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._output.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self) -> SIEProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_sie(
    code: str,
    base_url: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    client_kwargs: dict[str, Any] | None = None,
    inject: dict[str, Any] | None = None,
) -> SIEProcess:
    """Start `code` in the background: the test can look at the server while the client is at
    an `await checkpoint("name")` (`wait_reached("name")`, then `release("name")`)."""
    return SIEProcess(code, base_url, timeout_s, client_kwargs, inject)


def run_sie(
    code: str,
    base_url: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    client_kwargs: dict[str, Any] | None = None,
    inject: dict[str, Any] | None = None,
) -> Any:
    """Run `code` (the body of an async function with `client`/`aclient`) against `base_url`
    in the sie-sdk venv and return what it returns. Raises SIEFailure if an exception escapes
    the snippet, TimeoutError if it runs longer than `timeout_s`, RuntimeError if the child
    dies without a result. `client_kwargs` go to both client constructors (default
    `api_key=""`, so no environment credential is used); `inject` holds JSON values the
    snippet sees as module globals."""
    with start_sie(
        code, base_url, timeout_s, client_kwargs=client_kwargs, inject=inject
    ) as process:
        return process.result()


class SIERunner:
    """`run_sie`/`start_sie` bound to one base URL, for a fixture: `sie.run(code, ...)`."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.python = sie_python()

    def run(self, code: str, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> Any:
        return run_sie(code, self.base_url, timeout_s, **kwargs)

    def start(self, code: str, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any) -> SIEProcess:
        return start_sie(code, self.base_url, timeout_s, **kwargs)
