# lossd: two commands do all the set-up on a fresh machine.
#   make run    create/reuse .venv, install the three distributions, start `lossd serve`
#   make test   same set-up (plus the e2e services), then the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lossd-installed
PYTEST_ARGS ?=

.PHONY: run test check lint proto bench e2e-deps fuzz soak clean

$(STAMP): kernels/pyproject.toml client/pyproject.toml server/pyproject.toml requirements-test.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: this machine's CPU build, never a multi-GB CUDA download.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e kernels -e client -e server -r requirements-test.txt
	@touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lossd serve

e2e-deps:
	@bash scripts/install_e2e_deps.sh

test: $(STAMP) e2e-deps check
	$(PY) -m pytest $(PYTEST_ARGS)

LINTED := kernels client server tests bench scripts examples deploy

check: $(STAMP)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m mypy kernels/lossd client/lossd/client server/lossd
	$(PY) scripts/check_imports.py

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

# `lossd serve` in its own process, clients in others; BENCH_ARGS=--quick for a CI-sized run.
BENCH_ARGS ?=
PEERS := bench/.peers

bench: $(STAMP)
	$(PY) bench/bench_serve.py $(BENCH_ARGS)
	$(PY) bench/bench_kernels.py --quick
	$(PY) bench/bench_lm_memory.py

# The peers (KServe, py-spy) get venvs of their own under bench/.peers, never .venv;
# torch pinned first so that pip reuses this machine's CPU build.
$(PEERS)/kserve/.installed:
	$(PYTHON) -m venv $(PEERS)/kserve
	$(PEERS)/kserve/bin/pip install --quiet torch==2.13.0
	$(PEERS)/kserve/bin/pip install --quiet kserve==0.21.0
	@touch $@

$(PEERS)/tools/.installed:
	$(PYTHON) -m venv $(PEERS)/tools
	$(PEERS)/tools/bin/pip install --quiet py-spy
	@touch $@

bench-peers: $(STAMP) $(PEERS)/kserve/.installed $(PEERS)/tools/.installed
	$(PY) bench/bench_serve.py --peers $(BENCH_ARGS)

# Raw-gRPC fuzzing of a separately started `lossd serve`: FUZZ_REQUESTS (default 1,000,000),
# FUZZ_WORKERS client processes; prints the counts by status code, fails on INTERNAL/UNKNOWN/hangs/deaths.
fuzz: $(STAMP)
	$(PY) tests/fuzz/grpc_fuzz.py

# `lossd serve` soaked at twice its measured saturation with mixed sizes: SOAK_SECONDS (default 1800),
# SOAK_WORKERS client processes; prints RSS, open fds, p50/p99, counts by status; fails on leaks or errors.
soak: $(STAMP)
	$(PY) scripts/soak.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache
