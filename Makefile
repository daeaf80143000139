# make demo | make test | make bench -- each sets up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo demo-prefill test test-all lint bench quickstart clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# SmolLM2-135M-Instruct answers a question, streamed, checked against transformers (the
# first run downloads ~93 MB into ~/.cache/tee-actors; offline it runs a random preset).
demo: $(STAMP)
	$(BIN)/python examples/llama_generate.py

demo-prefill: $(STAMP)
	$(BIN)/python examples/llama_prefill.py

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py

lint: $(STAMP)
	$(BIN)/ruff check .

# Parallel pytest shards (tests/run_shards.py; TEST_JOBS=1 for one plain pytest).
test: lint
	$(BIN)/python tests/run_shards.py -q $(PYTEST_ARGS)

test-all: lint
	$(BIN)/python tests/run_shards.py -q -m "" $(PYTEST_ARGS)

bench: $(STAMP)
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/bench_transport.py --json benchmarks/results/transport.json
	$(BIN)/python benchmarks/bench_actors.py --json benchmarks/results/actors.json
	$(BIN)/python benchmarks/bench_small.py --json benchmarks/results/small.json
	$(BIN)/python benchmarks/bench_llama.py --json benchmarks/results/llama.json
	$(BIN)/python benchmarks/bench_generate.py --json benchmarks/results/generate.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
