# Two commands are all the set-up a new user does:
#   make demo   the main job (quickstart MLLM: build data, train, evaluate, report)
#   make test   the whole test suite (CPU; 8 fake devices for the sharding tests)
# Each creates .venv and installs what it needs on first use.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
PYTEST_ARGS ?=
export JAX_PLATFORMS ?= cpu
export HF_HUB_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 3

.PHONY: demo test install lint clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is only for parity tests: pin the CPU build first so nothing pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,hf]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --timeout=900 $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

lint: $(STAMP)
	$(BIN)/ruff check efficient_mllm pallas_kernels experiments configs tests

clean:
	rm -rf $(VENV) runs .pytest_cache
