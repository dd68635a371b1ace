#!/bin/sh
# Container entrypoint: `trillm serve`, configured from the environment
# (docker-compose.yml, docker/env.example); its arguments are passed on.
#   TRILLM_HOST        address to bind (default 127.0.0.1: with host networking
#                      that is the host's loopback; behind `-p 127.0.0.1:...`
#                      publishing use 0.0.0.0)
#   TRILLM_CHECKPOINT  checkpoint dir inside the container (default: the demo model)
#   TRITON_ADMIN_KEY   when set, model control is explicit (load/unload through
#                      the API, e.g. `trillm rollout`), and only requests carrying
#                      the header `admin-key: <key>` may use it (docs/versions.md)
#   HTTP_PORT, GRPC_PORT, METRICS_PORT, OPENAI_PORT   read by `trillm serve` itself
#                      (OPENAI_PORT: the OpenAI-compatible API, on TRILLM_HOST too)
set -eu

set -- --host "${TRILLM_HOST:-127.0.0.1}" "$@"
if [ -n "${TRILLM_CHECKPOINT:-}" ]; then
    set -- --checkpoint "$TRILLM_CHECKPOINT" "$@"
fi
if [ -n "${TRITON_ADMIN_KEY:-}" ]; then
    # trillm serve reads the key from TRILLM_ADMIN_KEY and builds tritonserver's
    # restricted-API flags from it (docs/versions.md).
    export TRILLM_ADMIN_KEY="$TRITON_ADMIN_KEY"
    set -- "$@" --model-control explicit
fi
unset TRITON_ADMIN_KEY
exec trillm serve "$@"
