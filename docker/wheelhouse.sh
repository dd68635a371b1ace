#!/usr/bin/env bash
# Collect every wheel the images install, so that `docker build` runs
# `pip install --no-index` and downloads nothing (inside a build pip sees
# neither this machine's pip configuration nor, here, any index at all).
#
# usage: docker/wheelhouse.sh OUT_DIR
#   OUT_DIR/app/     trillm and trillm_client (our code: small, rebuilt on every change)
#   OUT_DIR/triton/  third-party wheels of the server image (torch CPU, nvidia-pytriton, ...)
#   OUT_DIR/load/    third-party wheels of the Locust image
#
# Wheels are chosen for the images, not for this machine: CPython 3.11 on
# x86_64 with glibc <= 2.36 (Debian bookworm, the oldest base we build on).
# torch is the CPU build, torch==$TORCH_VERSION+cpu: from wherever this
# machine's pip finds it (its find-links or indexes), else from
# $TORCH_CPU_INDEX (PyTorch's CPU wheel index).
set -euo pipefail

out=${1:?usage: $0 OUT_DIR}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
root=$(cd "$(dirname "$0")/.." && pwd)

say() { echo "wheelhouse: $*" >&2; }

# pip does not widen a manylinux_2_N platform to older glibc versions: list them.
target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311)
for minor in $(seq 36 -1 17); do target+=(--platform "manylinux_2_${minor}_x86_64"); done
target+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

pip() { "$PYTHON" -m pip --disable-pip-version-check "$@"; }

rm -rf "$out.tmp"
mkdir -p "$out.tmp/app" "$out.tmp/triton" "$out.tmp/load"

say "building trillm and trillm_client wheels"
pip wheel --quiet --no-deps --wheel-dir "$out.tmp/app" "$root/backends" "$root/client"
trillm=$(ls "$out.tmp"/app/trillm-*.whl)
client=$(ls "$out.tmp"/app/trillm_client-*.whl)

torch="torch==$TORCH_VERSION+cpu"
say "fetching $torch"
if ! pip download --quiet --no-deps "${target[@]}" --dest "$out.tmp/triton" "$torch" 2>/dev/null; then
    say "this machine's pip has no $torch; trying $TORCH_CPU_INDEX"
    pip download --quiet --no-deps "${target[@]}" --dest "$out.tmp/triton" --extra-index-url "$TORCH_CPU_INDEX" "$torch"
fi
torch_wheel=$(ls "$out.tmp"/triton/torch-*.whl)

say "resolving the server image's dependencies"
pip download --quiet "${target[@]}" --dest "$out.tmp/triton" \
    pip "$torch_wheel" "${trillm}[server]" "$client"
say "resolving the Locust image's dependencies"
pip download --quiet "${target[@]}" --dest "$out.tmp/load" pip "$client" locust
# Our wheels live in app/ only, so that a code change leaves the big layers cached.
rm -f "$out.tmp"/triton/trillm*.whl "$out.tmp"/load/trillm*.whl

rm -rf "$out"
mv "$out.tmp" "$out"
say "$(du -sh "$out" | cut -f1) in $out: $(find "$out/triton" -name "*.whl" | wc -l) server wheels, $(find "$out/load" -name "*.whl" | wc -l) load wheels"
