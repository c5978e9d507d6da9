# Quickstart: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# TORCH is the torch requirement; CI pins a CPU build (TORCH=torch==2.13.0), elsewhere pip picks the wheel.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch>=2.4
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install dev bench clean system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e .
	touch $@

$(STAMP)-dev: $(STAMP)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(STAMP)

dev: $(STAMP)-dev

demo: $(STAMP)
	$(BIN)/alignflow run

# The suite in 2 worker processes, a test module per worker (its shared fixtures run once; the two team-stack
# modules may each start a stack of their own: 16 min here, against 28 with --dist loadgroup, which keeps them on one
# worker and one stack, tests/conftest.py); TEST_WORKERS=0 runs it in this one.
# Quick loop: $(BIN)/python -m pytest -m 'not slow'.
TEST_WORKERS ?= 2
TEST_DIST ?= loadfile
test: $(STAMP)-dev system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist $(TEST_DIST)

# The compose file is validated with Debian's docker-compose (no Docker engine needed).
system-deps:
	@command -v docker-compose >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null; } || \
	  echo "docker-compose is not installed: the compose validation test will fail"

# alignflow's PPO against TRL 1.12.0's on identical work (~20 min; TRL goes into benchmarks/.venv-trl, not here).
# BENCH_ARGS=--quick for a ~5 min version; results in benchmarks/results/.
bench: $(STAMP)-dev
	$(BIN)/python -m benchmarks.ppo_vs_trl $(BENCH_ARGS)

clean:
	rm -rf $(VENV) artifacts mlruns.db mlartifacts checkpoints
