# make demo: the toy world end to end (no downloads). make test: the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; an unpinned request pulls gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'

demo: $(BIN)/python
	$(BIN)/python -m attack demo

test: $(BIN)/python
	$(BIN)/ruff check attack eval_callbacks tests bench
	$(BIN)/python -m pytest -p no:cacheprovider tests

lint: $(BIN)/python
	$(BIN)/ruff check attack eval_callbacks tests bench

clean:
	rm -rf runs/demo .cache/toyworld
