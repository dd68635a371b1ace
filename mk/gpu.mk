# GPU targets, included at the end of the Makefile (it defines PYTEST_ARGS). They need an NVIDIA
# GPU and TensorRT-LLM (docs/gpu.md), and run in GPU_PYTHON, the Python that has tensorrt_llm:
# python3 (NVIDIA's container's own, or an active venv's), never .venv, whose torch is the CPU
# build. So they do not depend on `make install`: scripts/gpu_check.sh sets GPU_PYTHON up once.
GPU_PYTHON ?= python3
DEMO_CHECKPOINT := build/demo-model
CHECKPOINT ?= $(DEMO_CHECKPOINT)
ENGINE_DIR ?= build/trt-engine
BUILD_ENGINE_ARGS ?=
export GPU_PYTHON

.PHONY: build-engine gpu-check

build-engine: ## GPU host: build a TensorRT-LLM engine from CHECKPOINT (default the demo model) into ENGINE_DIR
	scripts/gpu_check.sh --setup
	$(if $(filter $(DEMO_CHECKPOINT),$(CHECKPOINT)),$(GPU_PYTHON) -m trillm.cli build-demo-model)
	$(GPU_PYTHON) -m trillm.cli build-engine --checkpoint $(CHECKPOINT) --out $(ENGINE_DIR) $(BUILD_ENGINE_ARGS)

gpu-check: ## GPU host: set up GPU_PYTHON (once), build the demo engine, run the GPU and server tests on it
	scripts/gpu_check.sh $(PYTEST_ARGS)
