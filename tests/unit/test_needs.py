"""A missing test tool fails under CI and skips locally (tests/needs.py)."""

from __future__ import annotations

import pytest

from tests.needs import in_ci, missing


@pytest.mark.parametrize(
    ("value", "ci"),
    [
        (None, False),
        ("", False),
        ("0", False),
        ("false", False),
        ("No", False),
        ("true", True),
        ("1", True),
        ("yes", True),
    ],
)
def test_in_ci_reads_the_ci_variable(value: str | None, ci: bool) -> None:
    assert in_ci({} if value is None else {"CI": value}) is ci


def test_missing_fails_under_ci() -> None:
    with pytest.raises(pytest.fail.Exception, match="chromium"):
        missing("chromium cannot be installed", {"CI": "true"})


def test_missing_skips_locally_and_says_why() -> None:
    with pytest.raises(pytest.skip.Exception, match="chromium cannot be installed"):
        missing("chromium cannot be installed", {})
