# lossd: two commands do all the set-up on a fresh machine.
#   make run    create/reuse .venv, install the three distributions, start `lossd serve`
#   make test   same set-up (plus the e2e services), then the whole suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lossd-installed
PYTEST_ARGS ?=

.PHONY: run test check lint proto bench e2e-deps clean

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

LINTED := kernels client server tests bench scripts examples

check: $(STAMP)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m ruff check $(LINTED)
	$(PY) -m mypy kernels/lossd client/lossd/client server/lossd

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

bench: $(STAMP)
	$(PY) bench/bench_kernels.py
	$(PY) bench/bench_wire.py
	$(PY) bench/bench_lm_memory.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache
