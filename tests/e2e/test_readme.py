"""Every fenced `bash` / `python` block of README.md and docs/*.md, run as a user would paste it.

Each block is named `<file> > <heading> > <lang> <n>` (the n-th block of that language under
that heading) and is either in RUN, with a check of its documented outcome, or in SKIPPED, with
the reason it cannot run here. A block that is in neither fails `test_recipe`, so a new recipe
is tested unless someone decides otherwise; a name that no longer matches a block fails too.

How a block runs:
- bash: `bash -c` with `set -eo pipefail`, from the repository root, in a fresh-shell
  environment (HOME, USER, LANG, TERM, PATH without the project's venv; no VIRTUAL_ENV,
  PYTHONPATH or RAY_*), so a block gets only what it (and the README text) sets up.
- python: saved to a file and run by the interpreter the README names for it, in the same
  fresh environment; the handles example runs inside a Ray task, as its comment says.
- Full-line `# ... <text> ...` comments state literal output: each must match (`...` is any text).

Where: the recipes hard-code `make serve`'s addresses; the test rewrites only those
(http://127.0.0.1:8000 -> the session stack's base URL, http://127.0.0.1:8265 -> the dashboard
of the head below, /tmp/poolserve-batch.jsonl -> a tmp file). The session stack listens on a free
port instead of 8000 so `make test` never collides with a stack a developer has running, and the
suite keeps one loaded model. HTTP, openai, sie-sdk and handles recipes run against the session
stack (the real engine). The Ray job recipe needs what the session cluster lacks (a head with a
job API, started as `make serve` starts it): it runs against a head that `scripts/stack.py serve`
itself starts (free ports, its own temp dir and state file, a PATH without the venv, as from a
fresh shell), serving the fake engine under the app name `poolserve`, so the suite still loads
one model; the job's `python` must be the project's or it fails to import ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from app.serve_env import free_port
from scripts.stack import process_tree, stop_processes
from tests.conftest import ROOT, Stack, fake_app_args
from tests.support.sse import parse, payloads
from tests.support.teardowns import Teardowns

pytestmark = pytest.mark.e2e

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python", "py": "python"}
LOCAL_API = "http://127.0.0.1:8000"
LOCAL_DASHBOARD = "http://127.0.0.1:8265"
BATCH_OUTPUT = "/tmp/poolserve-batch.jsonl"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
SIE_POOL = "eval-bench"
FRESH_SHELL_VARS = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TERM", "SHELL", "PYENV_ROOT")
BLOCK_TIMEOUT_S = 600.0
HEAD_READY_TIMEOUT_S = 600.0


# ---------------------------------------------------------------------------------------------
# The blocks


@dataclass(frozen=True)
class Block:
    file: str
    heading: str
    lang: str
    index: int
    line: int
    code: str

    @property
    def name(self) -> str:
        return f"{self.file} > {self.heading} > {self.lang} {self.index}"


FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")


def fenced_blocks(path: Path) -> Iterator[tuple[str, str, int, str]]:
    """(heading, info string, first line, dedented code) of every fenced block in a page."""
    heading = "(top)"
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if opened is None:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip()
            i += 1
            continue
        indent, fence, start = len(opened["indent"]), opened["fence"], i + 1
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            line = lines[i]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            i += 1
        i += 1
        yield heading, opened["info"].lower(), start, "\n".join(body) + "\n"


def recipe_blocks() -> list[Block]:
    found: list[Block] = []
    counts: dict[tuple[str, str, str], int] = {}
    for path in DOCUMENTS:
        file = str(path.relative_to(ROOT))
        for heading, info, line, code in fenced_blocks(path):
            lang = LANGUAGES.get(info)
            if lang is None:
                continue  # output samples, diagrams, YAML/JSON excerpts: not commands
            key = (file, heading, lang)
            counts[key] = counts.get(key, 0) + 1
            found.append(Block(file, heading, lang, counts[key], line, code))
    return found


BLOCKS = {block.name: block for block in recipe_blocks()}


# ---------------------------------------------------------------------------------------------
# Running a block as a user would


def fresh_env(**extra: str) -> dict[str, str]:
    """What a new login shell has: no venv on PATH, no VIRTUAL_ENV, PYTHONPATH or RAY_*."""
    env = {name: os.environ[name] for name in FRESH_SHELL_VARS if name in os.environ}
    venv_bins = {
        str(ROOT / ".venv" / "bin"),
        str(Path(os.environ.get("VIRTUAL_ENV", "/-")) / "bin"),
    }
    env["PATH"] = os.pathsep.join(
        p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p not in venv_bins
    )
    env.update(extra)
    return env


def localize(code: str, places: dict[str, str]) -> str:
    for documented, here in places.items():
        code = code.replace(documented, here)
    return code


@dataclass
class Ran:
    command: str
    returncode: int
    stdout: str
    stderr: str

    def ok(self) -> Ran:
        assert self.returncode == 0, (
            f"{self.command} -> exit {self.returncode}\n--- stdout\n{self.stdout}\n"
            f"--- stderr\n{self.stderr}"
        )
        return self


def run_bash(code: str, timeout_s: float = BLOCK_TIMEOUT_S) -> Ran:
    done = subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + code],
        cwd=ROOT,
        env=fresh_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return Ran(f"bash -c {code!r}", done.returncode, done.stdout, done.stderr)


def run_python(code: str, interpreter: Path, directory: Path) -> Ran:
    script = directory / "recipe.py"
    script.write_text(code)
    done = subprocess.run(
        [str(interpreter), str(script)],
        cwd=ROOT,
        env=fresh_env(),
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )
    return Ran(f"{interpreter} <<{code!r}", done.returncode, done.stdout, done.stderr)


def documented_outputs(code: str) -> list[re.Pattern[str]]:
    """Full-line `# ... text ...` comments: literal output, `...` standing for any text, any run
    of whitespace for any other, and spaces around `:` / `,` optional (compact JSON or not)."""
    patterns = []
    for line in code.splitlines():
        stripped = line.strip()
        if stripped.startswith("# ..."):
            parts = [_flexible(part.strip()) for part in stripped[1:].split("...")]
            patterns.append(re.compile(".*?".join(parts), re.DOTALL))
    return patterns


def _flexible(text: str) -> str:
    regex = ""
    for char in text:
        if char.isspace():
            regex += "" if regex.endswith(r"\s+") else r"\s+"
        elif char in ":,":
            regex += rf"\s*{char}\s*"
        else:
            regex += re.escape(char)
    return regex


def check_documented_outputs(code: str, output: str) -> None:
    for pattern in documented_outputs(code):
        assert pattern.search(output), f"documented output {pattern.pattern!r} not in:\n{output}"


def json_documents(text: str) -> list[Any]:
    """The JSON values printed one after another (curl -s adds no newline between bodies)."""
    decoder, at = json.JSONDecoder(), 0
    values: list[Any] = []
    while True:
        while at < len(text) and text[at].isspace():
            at += 1
        if at >= len(text):
            return values
        value, at = decoder.raw_decode(text, at)
        values.append(value)


# ---------------------------------------------------------------------------------------------
# A head started the way `make serve` starts it


@dataclass
class Head:
    dashboard_url: str
    api_url: str
    serve_stdout: str


def _head_pids(gcs_port: int, temp_dir: Path) -> list[int]:
    address = re.compile(rf"127\.0\.0\.1:{gcs_port}(?!\d)")
    return process_tree(
        lambda cmdline: (
            (address.search(cmdline) is not None or str(temp_dir) in cmdline)
            and "pytest" not in cmdline
        )
    )


@pytest.fixture(scope="module")
def make_serve_head(
    tmp_path_factory: pytest.TempPathFactory, teardowns: Teardowns
) -> Iterator[Head]:
    """`scripts/stack.py serve` (what `make serve` runs) on free ports with a temp dir and state
    file of its own, from a fresh-shell PATH; the fake engine as app `poolserve`. `stack.py
    stop` afterwards, and nothing of the head may survive."""
    work = tmp_path_factory.mktemp("make-serve")
    temp_dir = Path(tempfile.mkdtemp(prefix="psr-", dir="/tmp"))  # short: Ray's socket paths
    gcs_port, dashboard_port, http_port = free_port(), free_port(), free_port()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {**config.get("http_options", {}), "port": http_port}
    args = fake_app_args()
    args["profiles"] = [{**args["profiles"][0], "max_replicas": 1}]
    config["applications"][0]["args"] = args
    (work / "serve_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    start_args = [
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
    ]
    env = fresh_env(
        # what the Makefile exports to `scripts/stack.py`
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_agent_register_timeout_ms="120000",
        RAY_raylet_start_wait_time_s="120",
        HF_HUB_OFFLINE="1",
        POOLSERVE_RAY_PORT=str(gcs_port),
        POOLSERVE_RAY_DASHBOARD_PORT=str(dashboard_port),
        POOLSERVE_API_URL=f"http://127.0.0.1:{http_port}",
        POOLSERVE_STACK_STATE=str(work / "stack.json"),
        POOLSERVE_RAY_START_ARGS=shlex.join(start_args),
        POOLSERVE_READY_TIMEOUT_S=str(HEAD_READY_TIMEOUT_S),
    )

    def stack_py(command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_PYTHON), "scripts/stack.py", command, *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=HEAD_READY_TIMEOUT_S + 120,
            check=False,
        )

    try:
        started = time.monotonic()
        served = stack_py("serve", "--config", str(work / "serve_config.yaml"))
        assert served.returncode == 0, f"stack.py serve:\n{served.stdout}\n{served.stderr}"
        print(f"stack.py serve (fake engine) -> healthy in {time.monotonic() - started:.1f} s")
        yield Head(f"http://127.0.0.1:{dashboard_port}", env["POOLSERVE_API_URL"], served.stdout)
    finally:

        def stop() -> None:
            stopped = stack_py("stop")
            left = stop_processes(_head_pids(gcs_port, temp_dir))
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert stopped.returncode == 0, f"stack.py stop:\n{stopped.stdout}\n{stopped.stderr}"
            assert not left, f"processes of the test's make-serve head survived: {left}"

        # ~30 s of waiting for processes to exit: beside the next tests (tests/support/teardowns)
        teardowns.start("test_readme's make-serve head (stack.py stop)", stop)


# ---------------------------------------------------------------------------------------------
# Checks, one per block that runs here


Check = Callable[[Block, pytest.FixtureRequest], None]


def _session(request: pytest.FixtureRequest) -> Stack:
    stack: Stack = request.getfixturevalue("stack")
    return stack


def _pool_workers_back(base_url: str, timeout_s: float = 120) -> None:
    """Leave the session stack as found: the pool gone and every worker ready in `default`."""
    deadline = time.monotonic() + timeout_s
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        report = httpx.get(f"{base_url}/health", timeout=10).json()
        pools = {pool.get("name") for pool in report.get("pools", [])}
        workers = report.get("workers", [])
        if (
            SIE_POOL not in pools
            and workers
            and all(w.get("pool") == "default" and w.get("healthy") for w in workers)
        ):
            return
        time.sleep(1)
    raise AssertionError(f"the workers did not return to the default pool: {report}")


def check_use_it_curl(block: Block, request: pytest.FixtureRequest) -> None:
    """Chat (buffered, the documented answer), then SIE generate: SSE GenerateChunks whose
    text deltas make up a text, the last one `done`."""
    base = _session(request).base_url
    ran = run_bash(localize(block.code, {LOCAL_API: base})).ok()
    check_documented_outputs(block.code, ran.stdout)
    reply, end = json.JSONDecoder().raw_decode(ran.stdout)  # curl -s: no newline after it
    assert reply["object"] == "chat.completion", reply
    events = parse(ran.stdout[end:])
    chunks, _ = payloads(events)
    assert "".join(chunk.get("text_delta", "") for chunk in chunks).strip(), events
    assert chunks[-1]["done"] and not any(chunk["done"] for chunk in chunks[:-1]), events


def check_use_it_openai(block: Block, request: pytest.FixtureRequest) -> None:
    """The openai SDK streams a haiku, then the anthropic SDK answers a Messages request (its
    text and output tokens on the last line), with the project's interpreter (.venv/bin/python)."""
    base = _session(request).base_url
    tmp_path: Path = request.getfixturevalue("tmp_path")
    ran = run_python(localize(block.code, {LOCAL_API: base}), VENV_PYTHON, tmp_path).ok()
    *words, output_tokens = ran.stdout.split()
    assert len(words) >= 4 and 0 < int(output_tokens) <= 32, ran.stdout


def check_api_messages(block: Block, request: pytest.FixtureRequest) -> None:
    """docs/api.md's anthropic SDK example: an answer, then its usage (input and output
    tokens), with the project's interpreter."""
    base = _session(request).base_url
    tmp_path: Path = request.getfixturevalue("tmp_path")
    ran = run_python(localize(block.code, {LOCAL_API: base}), VENV_PYTHON, tmp_path).ok()
    text, _, usage = ran.stdout.partition("Usage(")
    assert text.strip() and "input_tokens=" in usage and "output_tokens=" in usage, ran.stdout


def check_pools_sie(block: Block, request: pytest.FixtureRequest) -> None:
    """sie-sdk with its own interpreter (`make sie-sdk` -> .venv-sie/bin/python): the pool goes
    pending -> active, a generation in it, capacity, delete."""
    from tests.sie import sie_python

    base = _session(request).base_url
    tmp_path: Path = request.getfixturevalue("tmp_path")
    assert sie_python() == ROOT / ".venv-sie" / "bin" / "python"  # what `make sie-sdk` builds
    try:
        ran = run_python(localize(block.code, {LOCAL_API: base}), sie_python(), tmp_path).ok()
        lines = ran.stdout.strip().splitlines()
        assert lines and lines[0] in {"pending", "active"}, ran.stdout
        assert "".join(lines[1:]).strip(), ran.stdout  # the generated text
        assert httpx.get(f"{base}/v1/pools/{SIE_POOL}", timeout=10).status_code == 404
    finally:
        httpx.delete(f"{base}/v1/pools/{SIE_POOL}", timeout=30)
        _pool_workers_back(base)


def check_pools_curl(block: Block, request: pytest.FixtureRequest) -> None:
    """The pool listing, one pool (eval-bench, created first as the example above creates it)
    and /health through json.tool: the documented shapes."""
    base = _session(request).base_url
    created = httpx.post(
        f"{base}/v1/pools",
        json={"name": SIE_POOL, "gpus": {"cpu": 1}, "gpu_caps": {"cpu": 1}},
        timeout=30,
    )
    assert created.status_code in (200, 201), created.text
    try:
        ran = run_bash(localize(block.code, {LOCAL_API: base})).ok()
        listing, pool, health = json_documents(ran.stdout)
        assert {"name", "state", "gpus", "worker_count"} <= set(listing["pools"][0]), listing
        assert SIE_POOL in {p["name"] for p in listing["pools"]}, listing
        assert pool["name"] == SIE_POOL and "spec" in pool, pool
        assert {"state", "assigned_workers"} <= set(pool["status"]), pool
        assert "\n    " in ran.stdout  # json.tool's indentation
        worker = health["workers"][0]
        assert {"pool", "node_id", "state", "memory_used_bytes"} <= set(worker), worker
        assert "pools" in health, health
    finally:
        httpx.delete(f"{base}/v1/pools/{SIE_POOL}", timeout=30)
        _pool_workers_back(base)


def check_tenants_curl(block: Block, request: pytest.FixtureRequest) -> None:
    """A shared pool with limits, one chat in it, then its usage: `/v1/usage` through
    json.tool counts the one request, `status.usage.requests` prints 1, and /metrics has the
    pool's `poolserve_usage_requests_total` line."""
    base = _session(request).base_url
    try:
        code = localize(block.code, {LOCAL_API: base})
        ran = run_bash(code).ok()
        check_documented_outputs(code, ran.stdout)
        usage = json_documents(ran.stdout.split("\n1\n")[0])[0]
        assert usage["pools"]["team-a"]["requests"] == 1, usage
        (row,) = usage["usage"]
        assert row["pool"] == "team-a" and row["key_id"] == "none", row
        assert row["completion_tokens"] >= 1 and row["prompt_tokens"] >= 1, row
        assert '\npoolserve_usage_requests_total{key_id="none"' in ran.stdout, ran.stdout
    finally:
        httpx.delete(f"{base}/v1/pools/team-a", timeout=30)


def check_handles(block: Block, request: pytest.FixtureRequest) -> None:
    """Inside a Ray task on the session cluster (as its comment says): a chat answer, then a
    stream of start, delta..., end events."""
    import ray

    _session(request)

    @ray.remote(num_cpus=0)
    def in_a_task(code: str) -> str:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
        return printed.getvalue()

    out = ray.get(in_a_task.remote(block.code), timeout=BLOCK_TIMEOUT_S)
    lines = out.splitlines()
    kind = re.compile(r"^(start|delta|end)( |$)")
    first = next(i for i, line in enumerate(lines) if kind.match(line))
    assert "".join(lines[:first]).strip(), out  # the chat answer's text, then the events
    kinds = [found[1] for line in lines[first:] if (found := kind.match(line))]
    assert kinds[0] == "start" and kinds[-1] == "end" and "delta" in kinds, out


def check_ray_job(block: Block, request: pytest.FixtureRequest) -> None:
    """`ray job submit ... python ray_job_batch.py` on a head `scripts/stack.py serve` started:
    the job's `python` is the project's, every prompt gets a record; `make serve`'s printed
    addresses are the README's."""
    head: Head = request.getfixturevalue("make_serve_head")
    tmp_path: Path = request.getfixturevalue("tmp_path")
    output = tmp_path / "poolserve-batch.jsonl"
    places = {LOCAL_DASHBOARD: head.dashboard_url, BATCH_OUTPUT: str(output)}
    code = localize(block.code, places)
    ran = run_bash(code).ok()
    check_documented_outputs(code, ran.stdout + ran.stderr)
    wanted = int(re.search(r"--num-prompts (\d+)", block.code)[1])  # type: ignore[index]
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(wanted)), records
    assert all("error" not in r and r["text"].strip() for r in records), records

    printed = make_serve_output()
    assert printed, "README.md: the `make serve` output block is gone"
    shown = localize(printed, {LOCAL_API: head.api_url, LOCAL_DASHBOARD: head.dashboard_url})
    for line in shown.splitlines():
        assert line in head.serve_stdout, f"make serve prints no {line!r}:\n{head.serve_stdout}"


def make_serve_output() -> str:
    """The unlabelled block after "`make serve` prints where everything is"."""
    text = (ROOT / "README.md").read_text()
    found = re.search(r"`make serve` prints where everything is.*?\n```\n(.*?)```", text, re.S)
    return found[1] if found else ""


def check_lines(pattern: str, expect: str) -> Check:
    """Run only the block's lines matching `pattern` (the rest start long jobs: see SKIPPED
    reasons in the docstring of the entry) and expect `expect` in their output."""

    def check(block: Block, request: pytest.FixtureRequest) -> None:
        lines = [line for line in block.code.splitlines() if re.search(pattern, line)]
        assert lines, f"no line of {block.name} matches {pattern!r}"
        ran = run_bash("\n".join(lines), timeout_s=120).ok()
        assert expect in ran.stdout, ran.stdout

    return check


RUN: dict[str, Check] = {
    "README.md > Use it > bash 1": check_use_it_curl,
    "README.md > Use it > python 1": check_use_it_openai,
    "README.md > Pools > python 1": check_pools_sie,
    "README.md > Pools > bash 1": check_pools_curl,
    "README.md > Tenants: usage, limits, priority > bash 1": check_tenants_curl,
    "docs/api.md > Ray jobs through handles > python 1": check_handles,
    "docs/api.md > Anthropic Messages API (`/v1/messages`) > python 1": check_api_messages,
    "docs/api.md > Ray jobs through handles > bash 1": check_ray_job,
    # only `compare.py --help`: `make bench` and the compare run take 30 min and start vLLM
    # servers of their own (tests/e2e/test_bench_smoke.py runs a tiny null-engine compare)
    "README.md > Benchmarks > bash 1": check_lines(r"--help", "--systems"),
    # only `local-cluster.sh profiles`: the rest is the cluster test below plus a second engine
    "docs/deploy.md > A local cluster of several nodes > bash 1": check_lines(
        r"local-cluster\.sh profiles", "cpu"
    ),
}

SKIPPED: dict[str, str] = {
    "README.md > The two commands > bash 1": (
        "`make serve` / `make test` themselves: the suite cannot run itself, nor a second full "
        "stack with a second engine; the Ray job check runs `scripts/stack.py serve` (what "
        "`make serve` runs) and compares its printed addresses with the README's"
    ),
    "docs/security.md > Where to put the keys > bash 1": "kubectl: needs a Kubernetes cluster",
    "docs/deploy.md > One machine, by hand > bash 1": (
        "`make stop` would end a developer's running stack, and the head it starts takes the "
        "fixed ports 6379/8265/8000 and loads a second engine; tests/e2e/test_serve_deploy.py "
        "runs the same `ray start --head`, `serve deploy serve_config.yaml`, `serve status`, "
        "`serve shutdown` on free ports"
    ),
    "docs/deploy.md > AWS > bash 1": "`ray up`: needs an AWS account",
    "docs/deploy.md > Kubernetes > bash 1": "kubectl: needs a Kubernetes cluster (KubeRay)",
    "docs/deploy.md > Head-node failure: GCS fault tolerance > bash 1": (
        "`make serve`/`make stop` on the fixed ports would end a developer's running stack; "
        "tests/e2e/test_gcs_fault_tolerance.py runs `scripts/stack.py serve` and `stop` with "
        "POOLSERVE_GCS_REDIS=1 on free ports and a Redis directory of its own"
    ),
    "docs/benchmarks.md > Side-by-side: poolserve vs vLLM vs Ray Serve LLM > bash 1": (
        "`make bench`: ~30 min with vLLM servers of its own (test_bench_smoke runs a tiny one)"
    ),
    "docs/reliability.md > The overload soak > bash 1": (
        "`make soak`: 10 to 30 min on a Ray cluster of its own"
    ),
    "docs/reliability.md > Changing the running service > bash 1": (
        "`benchmarks/changes.py`: ~10 min of load with engine reloads on `make serve`'s fixed "
        "ports and a multi-node cluster of its own; tests/e2e/test_changes_under_load.py runs "
        "the redeploy case"
    ),
}


def test_blocks_are_found() -> None:
    assert "README.md > Use it > bash 1" in BLOCKS, sorted(BLOCKS)
    assert not set(RUN) & set(SKIPPED), "a block is both run and skipped"
    stale = sorted((set(RUN) | set(SKIPPED)) - set(BLOCKS))
    assert not stale, f"no such block any more (renamed or moved?): {stale}"


@pytest.mark.parametrize("name", list(BLOCKS), ids=lambda name: name.replace(" ", "_"))
def test_recipe(name: str, request: pytest.FixtureRequest) -> None:
    block = BLOCKS[name]
    if name in SKIPPED:
        pytest.skip(f"{name}: {SKIPPED[name]}")
    check = RUN.get(name)
    assert check is not None, (
        f"{block.file}:{block.line} {name} is neither run nor skipped: add a check to RUN in "
        f"tests/e2e/test_readme.py, or a reason to SKIPPED\n{block.code}"
    )
    started = time.monotonic()
    check(block, request)
    print(f"{name}: passed in {time.monotonic() - started:.1f} s")
