#!/bin/sh
# Prometheus on 127.0.0.1:$PROMETHEUS_PORT, scraping trillm on 127.0.0.1:$METRICS_PORT.
# Prometheus does not expand variables in scrape targets, so the ports are filled in here.
set -eu

metrics_port=${METRICS_PORT:-8002}
prometheus_port=${PROMETHEUS_PORT:-9090}
config=/tmp/prometheus.yml
sed -e "s/@METRICS_PORT@/$metrics_port/g" -e "s/@PROMETHEUS_PORT@/$prometheus_port/g" \
    /etc/trillm/prometheus.yml.in >"$config"
exec prometheus \
    --config.file="$config" \
    --storage.tsdb.path=/prometheus \
    --web.listen-address="127.0.0.1:$prometheus_port" \
    "$@"
