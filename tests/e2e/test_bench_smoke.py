"""Smoke version of the side-by-side benchmark (benchmarks/compare.py, `make bench`): its
null-engine variant, tiny, end to end. compare.py drives the session stack's poolserve app with
the fake engine (conftest.py's `/fake`, passed as --null-url: no second Ray cluster) and the
minimal single-process HTTP baseline it starts and kills itself with `vllm bench serve`, and
prints its table. No real engine load, no network, no .venv-rayllm."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.stack import process_tree
from tests.conftest import FAKE_MODEL, ROOT, Stack

pytestmark = pytest.mark.e2e

TIMEOUT_S = 300  # ~20 s on an idle machine; longer when the 2 cores are shared


def test_compare_null_engine_smoke(stack: Stack, tmp_path: Path) -> None:
    report = tmp_path / "bench.md"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "compare.py"),
            "--rounds=0",
            "--null-streams=1,4",
            "--null-prompts=4",
            "--null-tokens=32",
            f"--null-url={stack.base_url}/fake",
            f"--null-model={FAKE_MODEL}",
            f"--log-dir={tmp_path}",
            f"--markdown={report}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "## Null engine" in result.stdout
    table = report.read_text()
    rows = [line for line in table.splitlines() if re.match(r"\| \d+ x 32 \|", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["1 x 32", "4 x 32"], table
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[1]) > 0 and float(cells[2]) > 0, row  # tokens/s through both
        assert cells[-2] == "0/8", row  # no failed request (4 prompts x 2 servers)
        assert all(float(load) >= 0 for load in cells[-1].split(",")), row  # load recorded
    # every process compare.py started is gone (its hosts name their tag on the command line)
    assert not process_tree(lambda cmdline: "--tag=bench-" in cmdline and str(tmp_path) in cmdline)
