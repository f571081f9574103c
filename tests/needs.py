"""What a test does when a tool it needs (Chromium, curl) cannot be had: under CI (the `CI`
environment variable set, as `.ci/run` sets it) it fails, so a green CI run means the test ran;
a local run skips and says why."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NoReturn

import pytest


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """CI services set `CI` (`true`, `1`); empty, `0`, `false` and `no` mean a local run."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str, environ: Mapping[str, str] = os.environ) -> NoReturn:
    if in_ci(environ):
        pytest.fail(f"{reason} (CI is set: a missing tool fails instead of skipping)", False)
    pytest.skip(f"{reason} (a local run skips; under CI this fails)")
