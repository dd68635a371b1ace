#!/usr/bin/env bash
# The GPU check (docs/gpu.md): one command on a host with an NVIDIA GPU and TensorRT-LLM,
#   scripts/gpu_check.sh [pytest args]          (`make gpu-check` runs the same)
# It runs in GPU_PYTHON, the Python that has tensorrt_llm: python3 by default, which is the
# container's own inside NVIDIA's Triton TensorRT-LLM image and the venv's when one is active.
# Never .venv: its torch is the CPU build, where tensorrt_llm needs its CUDA one.
#   0. set-up, once: trillm, trillm_client and the test tools installed into that Python, its torch
#      kept as it is (pinned); then the tensorrt_llm version is checked (trillm.trtllm.runtime);
#   1. the demo checkpoint, and a strict float32 engine from it: NVIDIA_TF32_OVERRIDE=0, for the
#      build and the tests, since TensorRT and cuBLAS would otherwise do float32 maths in TF32;
#   2. one pytest run, stopping at the first failure: the gpu tests, then the server tests with
#      the test server on that engine (TRILLM_TEST_ENGINE / TRILLM_TEST_ENGINE_DIR).
# `scripts/gpu_check.sh --setup` does step 0 only (`make build-engine` uses it).
# Fails, saying why, where there is no GPU or no usable tensorrt_llm.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${GPU_PYTHON:-python3}
ENGINE_DIR=$(realpath -m "${ENGINE_DIR:-build/gpu-check/engine}")

fail() { echo "gpu-check: $*" >&2; exit 1; }

setup() {
  command -v "$PY" >/dev/null || fail "no $PY here: set GPU_PYTHON to the Python that has tensorrt_llm"
  "$PY" -c "import tensorrt_llm" >/dev/null 2>&1 || fail "$PY cannot import tensorrt_llm: run this inside \
NVIDIA's Triton TensorRT-LLM image, or in a venv with tensorrt_llm>=1.0,<1.3 (or set GPU_PYTHON); see docs/gpu.md"
  if ! "$PY" -c "import sys, pytest, tritonclient, trillm_client, trillm
sys.exit(not trillm.__file__.startswith('$PWD/backends/'))" 2>/dev/null; then
    echo "== 0. installing trillm, trillm_client and the test tools into $PY (once)"
    local keep extras=test
    keep=$(mktemp)
    # NVIDIA's torch has a pre-release version that pip would swap for PyPI's: pin what is there.
    "$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$keep"
    command -v tritonserver >/dev/null || extras=server,test  # NVIDIA's image has its own tritonserver
    # A container's system Python is the one its Triton Python backend runs, and ours to install into
    # (Ubuntu 24.04 based images mark it externally managed).
    if [ -f /.dockerenv ] || [ -f /run/.containerenv ]; then export PIP_BREAK_SYSTEM_PACKAGES=1; fi
    "$PY" -m pip install --quiet --constraint "$keep" -e "backends[$extras]" -e client
    rm -f "$keep"
  fi
  "$PY" -c "import sys
from trillm.trtllm.runtime import TrtLlmUnavailable, load_api
try:
    load_api()
except TrtLlmUnavailable as exc:
    sys.exit(f'gpu-check: {exc}')" >/dev/null
}

nvidia-smi -L || fail "no usable NVIDIA GPU (nvidia-smi -L failed)"
setup
[ "${1:-}" != --setup ] || exit 0

export NVIDIA_TF32_OVERRIDE=0
echo "== 1. demo checkpoint and strict float32 engine ($ENGINE_DIR)"
"$PY" -m trillm.cli build-demo-model
"$PY" -m trillm.cli build-engine --checkpoint build/demo-model --out "$ENGINE_DIR" --force --dtype float32 \
  --max-batch-size 16 --max-seq-len 1024 --max-input-len 512 --max-num-tokens 2048

echo "== 2. GPU tests, then the server tests on the TensorRT-LLM engine"
TRILLM_TEST_ENGINE=tensorrt_llm TRILLM_TEST_ENGINE_DIR="$ENGINE_DIR" \
  "$PY" -m pytest -x -m "server or gpu" tests/trtllm/test_gpu.py tests/server "$@"
