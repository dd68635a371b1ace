#!/usr/bin/env bash
# The GPU check (docs/gpu.md), for a host with an NVIDIA GPU and TensorRT-LLM:
#   1. build a TensorRT-LLM engine from the demo checkpoint (trillm build-engine);
#   2. serve it with `trillm serve --engine tensorrt_llm --engine-dir ...` and ask it something;
#   3. run `pytest -m "server or gpu"` with the test server on that engine
#      (TRILLM_TEST_ENGINE / TRILLM_TEST_ENGINE_DIR; extra arguments go to pytest).
# Fails, saying why, where there is no GPU or no tensorrt_llm.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
TRILLM=${TRILLM:-.venv/bin/trillm}
CHECKPOINT=${CHECKPOINT:-build/demo-model}
ENGINE_DIR=$(realpath -m "${ENGINE_DIR:-build/gpu-check/engine}")
WORK=build/gpu-check
MAX_SEQ_LEN=1024
MAX_INPUT_LEN=512

nvidia-smi -L || { echo "gpu-check: no usable NVIDIA GPU (nvidia-smi failed)" >&2; exit 1; }
"$PY" -c "import tensorrt_llm" \
  || { echo "gpu-check: $PY cannot import tensorrt_llm; see docs/gpu.md" >&2; exit 1; }
mkdir -p "$WORK"

echo "== 1. demo checkpoint and engine ($ENGINE_DIR)"
[ "$CHECKPOINT" != build/demo-model ] || "$TRILLM" build-demo-model
"$TRILLM" build-engine --checkpoint "$CHECKPOINT" --out "$ENGINE_DIR" --force --dtype float32 \
  --max-batch-size 16 --max-seq-len "$MAX_SEQ_LEN" --max-input-len "$MAX_INPUT_LEN" --max-num-tokens 2048

echo "== 2. trillm serve --engine tensorrt_llm"
free_port() { "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
HTTP_PORT=$(free_port); GRPC_PORT=$(free_port); METRICS_PORT=$(free_port)
"$TRILLM" serve --checkpoint "$CHECKPOINT" --engine tensorrt_llm --engine-dir "$ENGINE_DIR" \
  --work-dir "$WORK/serve" --max-model-len "$MAX_SEQ_LEN" --max-input-len "$MAX_INPUT_LEN" \
  --http-port "$HTTP_PORT" --grpc-port "$GRPC_PORT" --metrics-port "$METRICS_PORT" >"$WORK/serve.log" 2>&1 &
SERVER=$!
stop_server() { kill -TERM "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap stop_server EXIT
for _ in $(seq 600); do
  curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { echo "gpu-check: the server exited:" >&2; tail -50 "$WORK/serve.log" >&2; exit 1; }
  sleep 1
done
curl -sf "http://127.0.0.1:$HTTP_PORT/v2/health/ready" >/dev/null \
  || { echo "gpu-check: the server is not ready after 600 s:" >&2; tail -50 "$WORK/serve.log" >&2; exit 1; }
ANSWER=$(curl -sf -X POST "http://127.0.0.1:$HTTP_PORT/v2/models/ensemble/generate" \
  -d '{"text_input": "The capital of France is", "max_tokens": 16}')
echo "$ANSWER"
grep -q '"text_output"' <<<"$ANSWER" || { echo "gpu-check: no text_output in the answer" >&2; exit 1; }
stop_server
trap - EXIT

echo "== 3. server and GPU tests on the TensorRT-LLM engine"
TRILLM_TEST_ENGINE=tensorrt_llm TRILLM_TEST_ENGINE_DIR="$ENGINE_DIR" \
  "$PY" -m pytest -m "server or gpu" "$@"
