#!/bin/sh
# Locust with its web UI on 127.0.0.1:$LOCUST_WEB_PORT, aimed at the trillm
# server on this host (HTTP_PORT; the suite reads GRPC_PORT for gRPC), like
# `make load-ui`: pick the user classes (transports) and the TrillmShape in
# the UI. load_tests/ is mounted from the repository; arguments go to locust
# (e.g. --input-tokens 128 --output-tokens 64; docs/load-tests.md).
set -eu

locustfile=${LOCUSTFILE:-load_tests/locustfile.py}
if [ ! -f "$locustfile" ]; then
    echo "locust: no $locustfile in the mounted repository (./load_tests); nothing to run" >&2
    exit 1
fi
exec locust -f "$locustfile" \
    --host "http://127.0.0.1:${HTTP_PORT:-8000}" \
    --web-host 127.0.0.1 --web-port "${LOCUST_WEB_PORT:-8089}" \
    --class-picker \
    "$@"
