# Quickstart: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
# TORCH is the torch requirement; CI pins a CPU build (TORCH=torch==2.13.0), elsewhere pip picks the wheel.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch>=2.4
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install dev bench clean

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

test: $(STAMP)-dev
	$(BIN)/python -m pytest

bench: $(STAMP)-dev
	$(BIN)/python -m benchmarks.ppo_vs_trl

clean:
	rm -rf $(VENV) artifacts mlruns.db mlartifacts checkpoints
