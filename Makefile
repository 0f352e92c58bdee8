# splitpack: `make demo` serves a model with split-pack and answers a request; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench bench-compile bench-planner loadtest clean

setup: $(VENV)/.installed

# Everything (core + TorchServe + Triton + offline weights + plots + test tools), at the exact versions
# of constraints.txt; torch==2.14.1 / torchvision==0.29.1 come from the machine's local wheel store
# through pip (uv/poetry would download GBs); numpy<2 is required by the Triton python-backend stub.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[all,dev]'
	touch $@

demo: setup
	$(PY) -m splitpack.cli demo

# Test files run in TEST_WORKERS processes side by side (pytest-xdist; a file's tests stay in one process, so its
# server fixtures start once): the server tests spend most of their time waiting for servers to start and stop,
# and each process gets cores / TEST_WORKERS torch threads (tests/conftest.py). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

bench: setup
	$(PY) scripts/bench_suite.py | tee benchmarks/table.md

# Compiled split-pack: split/unsplit latency interpreted, as a recorded program and through torch.compile; peak memory.
bench-compile: setup
	uptime
	$(PY) scripts/bench_compile.py --out benchmarks/compile.json | tee benchmarks/compile.md
	uptime

# The planner's evidence (merge_layer auto): predicted vs measured peaks at 512 and 1024, the chosen plan vs a brute
# force at 512, planning time of efficientnet_b7 at 600; its section of BENCHMARKS.md is rewritten.
bench-planner: setup
	$(PY) scripts/bench_planner.py --write BENCHMARKS.md --json benchmarks/planner.json

# Both servers with default settings, 4 clients x 60 s + a bad-input client, thread sweep (BENCHMARKS.md).
loadtest: setup
	$(PY) scripts/loadtest.py --json benchmarks/loadtest.json

clean:
	rm -rf .run logs model_store/*.mar
