# Two commands set everything up: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.py
WORKDIR ?= runs/default
ARGS ?=
PYTEST_ARGS ?=

# The CUDA build of JAX when an NVIDIA GPU is visible, the CPU build otherwise.
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TRAIN_EXTRAS := $(if $(GPU),[cuda12],)

.PHONY: train test test-slow lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.train-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".$(TRAIN_EXTRAS)"
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[dev,torch]"
	touch $@ $(VENV)/.train-installed

train: $(VENV)/.train-installed
	$(BIN)/cifar-jax --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: $(VENV)/.test-installed
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q --durations=25 $(PYTEST_ARGS)

test-slow: $(VENV)/.test-installed
	JAX_PLATFORMS=cpu $(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check cifar_jax configs tests scripts

clean:
	rm -rf $(VENV) .pytest_cache
