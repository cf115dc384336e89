# The two commands of the README. Each sets itself up (scripts/bootstrap.sh is idempotent).
SHELL := /bin/bash
VENV ?= .venv
export DS_ACCELERATOR ?= cpu
# DeepSpeed compiles some ops on first use; keep them between runs.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup services demo test lint format gpu-check

setup:
	@scripts/bootstrap.sh

## System services the tests use (a one-machine SLURM cluster needs slurm-wlm + munge).
services:
	@scripts/services.sh install

## The embedded CPU demo: corpus -> shards in a local S3 -> pretrain (2 ranks) -> stop -> resume -> export.
demo: setup
	$(VENV)/bin/electra-scale demo --workdir demo-output

## Lint, format check and the whole test suite (starts its own SeaweedFS), two test files at a time, in the
## order tests/conftest.py gives them (longest first: --no-loadscope-reorder keeps it).
test: setup services lint
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

lint:
	$(VENV)/bin/ruff check electra_scale tests
	$(VENV)/bin/ruff format --check electra_scale tests

format:
	$(VENV)/bin/ruff format electra_scale tests
	$(VENV)/bin/ruff check --fix electra_scale tests

## The GPU check (scripts/gpu_check.sh; README: The GPU check): make gpu-check OUT=dir [WHEELS=dir] [DRY_RUN=1]
gpu-check:
	scripts/gpu_check.sh --out $(or $(OUT),gpu-check) $(if $(WHEELS),--wheels $(WHEELS)) $(if $(DRY_RUN),--dry-run)
