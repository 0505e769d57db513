# Two entry points for a fresh machine: `make run` (the whole pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0

.PHONY: setup
setup: $(BIN)/activate
	$(BIN)/pip install -q -e ".[dev]"

.PHONY: run
run: setup
	$(BIN)/scratchllm pipeline

.PHONY: test
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

.PHONY: lint
lint:
	$(BIN)/ruff check .
