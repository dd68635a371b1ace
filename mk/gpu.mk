# GPU targets, included at the end of the Makefile (it defines VENV, STAMP, PYTEST_ARGS and demo-model).
# They need an NVIDIA GPU and TensorRT-LLM: see docs/gpu.md.
DEMO_CHECKPOINT := build/demo-model
CHECKPOINT ?= $(DEMO_CHECKPOINT)
ENGINE_DIR ?= build/trt-engine
BUILD_ENGINE_ARGS ?=

.PHONY: build-engine gpu-check

build-engine: $(STAMP) $(if $(filter $(DEMO_CHECKPOINT),$(CHECKPOINT)),demo-model) ## build a TensorRT-LLM engine from CHECKPOINT (default the demo model) into ENGINE_DIR; GPU host
	$(VENV)/bin/trillm build-engine --checkpoint $(CHECKPOINT) --out $(ENGINE_DIR) $(BUILD_ENGINE_ARGS)

gpu-check: $(STAMP) ## GPU host: build an engine from the demo model, serve it, run the server and gpu tests on it
	scripts/gpu_check.sh $(PYTEST_ARGS)
