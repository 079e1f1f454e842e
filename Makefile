PYTHON ?= python3
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: help install install-vllm demo test test-vllm test-fast bench gpu-check proto lint fmt

help:
	@echo "make demo      install what is missing, then run the disaggregated prefill/decode demo"
	@echo "make test      install what is missing, then run the whole test suite"
	@echo "make test-vllm only the vLLM connector's tests (vLLM's CPU build in .venv-vllm)"
	@echo "make bench     run every benchmark (JSON on stdout)"
	@echo "make gpu-check codec CPU/CUDA byte parity, GPU codec and host<->device speed (CPU half without CUDA)"
	@echo "make proto     regenerate gRPC stubs from proto/"
	@echo "make lint      ruff check, ruff format --check (fails on drift; make fmt fixes it), mypy (strict on transfer/)"

install:
	@bash scripts/bootstrap.sh

# vLLM's CPU build in its own venv (.venv-vllm): only the vLLM connector's tests and bench need it,
# so `make demo` does not pay for it.
install-vllm: install
	@bash scripts/bootstrap-vllm.sh

demo: install
	$(PYTHON) -m kvstore demo

VLLM_PYTHON ?= .venv-vllm/bin/python

test: install install-vllm
	$(PYTHON) -m pytest -q
	$(VLLM_PYTHON) -m pytest -q tests/vllm

test-vllm: install-vllm
	$(VLLM_PYTHON) -m pytest -q tests/vllm

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow and not e2e"

bench: install install-vllm
	@for b in bench/*.py; do echo "== $$b"; $(PYTHON) $$b || exit 1; done

# No `install` prerequisite: the install step pip-installs into the environment and replaces any torch
# but 2.13.0, which a lent GPU machine (its own CUDA build of torch, maybe offline) does not want.
# The script itself says which dependency is missing (exit status 2).
gpu-check:
	$(PYTHON) bench/gpu_check.py

proto:
	$(PYTHON) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/kvstore/v1/kvstore.proto

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

fmt:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .
