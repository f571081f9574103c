# The README's two commands: `make serve` (whole stack, local) and `make test` (the suite).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
# a loaded 2-core machine can take longer than Ray's defaults to bring a node's agents up
export RAY_agent_register_timeout_ms := 120000
export RAY_raylet_start_wait_time_s := 120
export HF_HUB_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install model sie-sdk serve stop test unit soak bench bench-routing lint style imports \
	typecheck check clean

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m app.engine.default_model

# The sie-sdk client for the README's Pools example: it needs Python >= 3.12, so its own venv
# .venv-sie, pinned by tests/sie-requirements.lock and built by tests/sie.py as the tests build it
sie-sdk: install
	$(PY) -c "from tests.sie import sie_python; print('sie-sdk ready:', sie_python())"

serve: model
	$(PY) scripts/stack.py serve

stop:
	@test -x $(PY) || { echo "nothing to stop (no $(VENV))"; exit 0; }
	$(PY) scripts/stack.py stop

# The suite, after the static checks in this order: ruff, ruff format --check, mypy strict,
# import-linter (the same as `make check`; .ci/run runs this). A failing check stops it before
# pytest starts.
test: style typecheck imports model
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit tier alone, for an edit loop: no model, no Ray cluster (under 20 s here); with the
# benchmarks' own unit tests (benchmarks/test_*.py)
unit: install
	$(PY) -m pytest tests/unit benchmarks $(PYTEST_ARGS)

# Bounded overload soak (issue 8; not part of `make test`): its own local Ray + the real engine,
# load above capacity for SOAK_ARGS (default 10 min, never over 30); result in docs/reliability.md
SOAK_ARGS ?=
soak: model
	$(PY) benchmarks/soak.py $(SOAK_ARGS)

# Side-by-side benchmark (issue 9; ~25-35 min, not part of `make test`): bare vLLM, Ray Serve LLM
# (from .venv-rayllm, made on demand) and poolserve, one at a time, with `vllm bench serve`.
BENCH_ARGS ?= --markdown .cache/bench/results.md
bench: model
	$(PY) benchmarks/compare.py $(BENCH_ARGS)

# Issue 5's benchmarks (~17 min, not part of `make test`): streaming cost through Ray with a null
# engine (coalesced vs one object per token), then KV/prefix-aware routing vs Serve's power-of-two
# router on two real workers and admission under 3x overload.
ROUTING_ARGS ?= --sessions 20 --kv-gib 0.375 --markdown .cache/bench/routing.md
bench-routing: model
	@mkdir -p .cache/bench
	$(PY) benchmarks/stream_overhead.py
	$(PY) benchmarks/routing.py $(ROUTING_ARGS)

# Scale-out (~6 min, not part of `make test`): the control decisions in process at 1,000 workers,
# 10,000 pools and 100,000 API keys, the ledger's and the registry's ceilings, then a local
# multi-node cluster (cluster/local-cluster.sh) of null-engine workers with 1, 2 and 4 ingress
# replicas: requests/s, first token, CPU per request. Results: docs/scaling.md.
SCALE_ARGS ?= --markdown .cache/bench/scale-cluster.md
bench-scale: install
	@mkdir -p .cache/bench
	$(PY) benchmarks/bench_scale.py --markdown .cache/bench/scale-inprocess.md
	$(PY) benchmarks/scale_cluster.py $(SCALE_ARGS)

# ruff, and import-linter for the layers of docs/architecture.md (contracts in pyproject.toml)
lint: style imports

style: install
	$(VENV)/bin/ruff check app tests scripts benchmarks
	$(VENV)/bin/ruff format --check app tests scripts benchmarks

imports: install
	$(VENV)/bin/lint-imports

# mypy strict ([tool.mypy] in pyproject.toml)
typecheck: install
	$(VENV)/bin/mypy

# what CI runs (.ci/run: make test): the static checks, then the suite
check: test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
