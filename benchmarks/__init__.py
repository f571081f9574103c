"""The benchmarks: command-line programs (`python benchmarks/NAME.py`, or the Makefile's bench
targets) and their own unit tests. They import from `app` and `tests.support`; tests never import
them (an import-linter contract in pyproject.toml)."""
