#!/usr/bin/env bash
# Build a Debian bookworm base image with Python 3.11 (and g++) from Debian packages
# alone (debootstrap, then `docker import`), for machines that reach a Debian
# mirror but no container registry. Python must be 3.11: the wheelhouse holds
# cp311 wheels and the tritonserver wheel's Python backend stub is the 3.11 one.
#
# usage: docker/build_base.sh IMAGE_TAG [WORK_DIR]
# The mirror is the one this machine's apt uses (/etc/apt/sources.list*);
# DEBIAN_MIRROR overrides it. Skips the build when IMAGE_TAG already exists
# and was made by this version of the script (FORCE=1 rebuilds).
set -euo pipefail

tag=${1:?usage: $0 IMAGE_TAG [WORK_DIR]}
work=${2:-build/docker-base}
suite=bookworm
# g++ (with libgomp1, OpenMP's runtime): the engine compiles its native kernels for the CPU it runs
# on (trillm.engine.native, -march=native); without a compiler it falls back to torch's ops.
packages=python3.11,python3.11-venv,python3-venv,libpython3.11,ca-certificates,g++,libgomp1
recipe=$(sha256sum "$0" | cut -c1-16)

say() { echo "docker-base: $*" >&2; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ "${FORCE:-0}" != 1 ] &&
   [ "$(docker image inspect --format '{{ index .Config.Labels "org.trillm.base-recipe" }}' "$tag" 2>/dev/null)" = "$recipe" ]; then
    say "$tag is up to date (recipe $recipe)"
    exit 0
fi

# "URI SUITE" for every enabled deb entry of this machine's apt sources,
# one-line (*.list) and deb822 (*.sources) formats alike.
apt_entries() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } print $i, $(i + 1) }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'BEGIN { RS = ""; FS = "\n" }
        {
            delete field
            for (j = 1; j <= NF; j++) {
                if ($j ~ /^[ \t]*#/ || $j !~ /:/) continue
                key = tolower($j); sub(/:.*/, "", key)
                value = $j; sub(/^[^:]*:[ \t]*/, "", value)
                field[key] = value
            }
            if (field["types"] !~ /(^| )deb( |$)/ || tolower(field["enabled"]) == "no") next
            n = split(field["uris"], uris, /[ \t]+/); m = split(field["suites"], suites, /[ \t]+/)
            for (u = 1; u <= n; u++) for (s = 1; s <= m; s++) print uris[u], suites[s]
        }' "$f"
    done
}

entries=$(apt_entries | awk -v s="$suite" '$2 == s || $2 == s "-updates" || $2 == s "-security"' | sort -u)
mirror=${DEBIAN_MIRROR:-$(awk -v s="$suite" '$2 == s { print $1; exit }' <<<"$entries")}
if [ -z "$mirror" ]; then
    say "no Debian '$suite' entry in /etc/apt/sources.list*; set DEBIAN_MIRROR=http://<your mirror>/debian"
    exit 1
fi
command -v debootstrap >/dev/null || {
    say "installing debootstrap"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

rootfs="$work/rootfs"
as_root rm -rf "$rootfs"
mkdir -p "$work"
say "debootstrap $suite from $mirror (packages: $packages)"
as_root debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    say "debootstrap failed; last lines of $work/debootstrap.log:"
    tail -n 20 "$work/debootstrap.log" >&2
    exit 1
}

# The image's apt uses the same mirrors (updates and security too when this machine has them).
if [ -n "$entries" ] && [ -z "${DEBIAN_MIRROR:-}" ]; then
    awk '{ print "deb", $1, $2, "main" }' <<<"$entries"
else
    echo "deb $mirror $suite main"
fi | as_root tee "$rootfs/etc/apt/sources.list" >/dev/null
as_root rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*

say "importing $rootfs as $tag"
as_root tar -C "$rootfs" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --change "LABEL org.trillm.base-recipe=$recipe" \
    - "$tag" >/dev/null
as_root rm -rf "$rootfs"
docker run --rm --network none "$tag" python3 -c 'import sys, venv; assert sys.version_info[:2] == (3, 11), sys.version'
docker run --rm --network none "$tag" g++ --version >/dev/null
say "$tag ready ($(docker image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec))"
