#!/bin/sh
# nginx in the foreground in front of the replicas in TRILLM_LB_REPLICAS
# (HOST:HTTP_PORT:GRPC_PORT[:OPENAI_PORT], comma-separated), listening on
# TRILLM_LB_HOST (default 127.0.0.1): HTTP on HTTP_PORT, gRPC on GRPC_PORT,
# and the OpenAI API on OPENAI_PORT when every replica has an OpenAI port.
# The master runs as root, its workers as www-data; logs go to the container's
# output. Extra arguments go to nginx (`-t`: check the config and exit).
# TRILLM_LB_SCRIPT and TRILLM_LB_WORK_DIR let tests run this outside the image.
set -eu

work=${TRILLM_LB_WORK_DIR:-/run/trillm-lb}
python3 "${TRILLM_LB_SCRIPT:-/usr/local/lib/trillm-lb/lb.py}" \
    --replica "${TRILLM_LB_REPLICAS:?set TRILLM_LB_REPLICAS to HOST:HTTP_PORT:GRPC_PORT,... of the replicas}" \
    --work-dir "$work" --out "$work/nginx.conf" \
    --listen-host "${TRILLM_LB_HOST:-127.0.0.1}" \
    --http-port "${HTTP_PORT:-8000}" --grpc-port "${GRPC_PORT:-8001}" --openai-port "${OPENAI_PORT:-9000}" \
    --user www-data --error-log stderr --access-log /dev/stdout
exec nginx -p "$work" -c "$work/nginx.conf" -e stderr -g 'daemon off;' "$@"
