#!/usr/bin/env bash
# Make `docker` and a compose tool usable on this machine: install Debian's
# docker.io and docker-compose when missing, start dockerd when no daemon
# answers. Idempotent; CI runs it before the docker tests.
#
# Machines without systemd (containers, microVMs whose init is not systemd)
# get dockerd started directly, logging to $DOCKERD_LOG.
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/trillm-dockerd.log}
READY_TIMEOUT=${READY_TIMEOUT:-60}

say() { echo "ensure_docker: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

daemon_answers() { docker info >/dev/null 2>&1; }

have_compose() {
    docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1
}

install_packages() {
    local packages=()
    command -v dockerd >/dev/null 2>&1 || packages+=(docker.io)
    have_compose || packages+=(docker-compose)
    [ "${#packages[@]}" -eq 0 ] && return 0
    say "installing ${packages[*]} from the Debian mirror"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
}

start_daemon() {
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        say "starting docker with systemd"
        as_root systemctl start docker
    else
        say "no systemd: starting dockerd directly (log: $DOCKERD_LOG)"
        # setsid: the daemon outlives this script's session (a CI step, a login shell).
        as_root setsid sh -c "exec dockerd >'$DOCKERD_LOG' 2>&1" </dev/null &
    fi
    local waited=0
    until daemon_answers; do
        if [ "$waited" -ge "$READY_TIMEOUT" ]; then
            say "dockerd did not answer within ${READY_TIMEOUT}s; last lines of $DOCKERD_LOG:"
            as_root tail -n 30 "$DOCKERD_LOG" >&2 || true
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
}

if ! daemon_answers || ! have_compose; then
    install_packages
fi
daemon_answers || start_daemon
say "docker $(docker version --format '{{.Server.Version}}') is running; compose: $(docker compose version --short 2>/dev/null || docker-compose version --short)"
